"""The review-page artifacts of a relabel run, built without a Prefect server (the create_* calls are recorded)."""

from pathlib import Path

from pipeline import artifacts


def summary(review: dict | None) -> dict:
    return {"version": "abc-def", "classifier": "abc", "params_fingerprint": "def", "images": 6, "inputs": 7,
            "rejects": 1, "predicted": 4, "given": 2, "metrics": {}, "params": {}, "timings": {}, "review": review,
            "per_class": [], "per_image": []}


def test_the_review_link_says_the_path_in_words(tmp_path):
    page = tmp_path / "holiday" / "abc-def" / "review.html"
    text = artifacts.review_markdown(page, "holiday abc-def")
    assert f"Path: `{page.resolve()}`" in text  # browsers refuse file:// links from the UI's http page
    assert f"[review.html]({page.resolve().as_uri()})" in text and "address bar" in text
    table = artifacts.collection_markdown("holiday", "relabelled", {"summary": summary(
        {"file": "review.html", "rows": 6, "bytes": 1000})}, tmp_path / "holiday")
    assert f"| review page | `{tmp_path / 'holiday' / 'abc-def' / 'review.html'}`: the 6 lowest-confidence" in table
    assert "review page" not in artifacts.collection_markdown("holiday", "relabelled", {"summary": summary(None)},
                                                              tmp_path / "holiday")


def test_publish_collection_links_the_review_page_when_it_exists(tmp_path, monkeypatch):
    calls = []
    for name in ("create_markdown_artifact", "create_table_artifact", "create_link_artifact"):
        monkeypatch.setattr(artifacts, name, lambda *a, _name=name, **k: calls.append((_name, a, k)))
    folder = tmp_path / "holiday"
    current = {"summary": summary({"file": "review.html", "rows": 6, "bytes": 1000})}
    artifacts.publish_collection("holiday", "relabelled", current, folder, rows_limit=5)
    assert not [c for c in calls if c[2].get("key") == "relabel-holiday-review"]  # no file, no link
    page: Path = folder / "abc-def" / "review.html"
    page.parent.mkdir(parents=True)
    page.write_text("<!DOCTYPE html>")
    calls.clear()
    artifacts.publish_collection("holiday", "relabelled", current, folder, rows_limit=5)
    review = [c for c in calls if c[2].get("key") == "relabel-holiday-review"]
    assert len(review) == 1 and review[0][0] == "create_markdown_artifact" and str(page.resolve()) in review[0][1][0]
    links = [c for c in calls if c[0] == "create_link_artifact"]
    assert [c[1][0] for c in links] == [page.resolve().as_uri()] and str(page.resolve()) in links[0][2]["description"]
