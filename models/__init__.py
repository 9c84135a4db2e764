"""Pure torch/timm models: ToCo, CAMs, CTC, PAR, losses (no file I/O, no shards/stages imports)."""
