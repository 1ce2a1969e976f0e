"""Rebuild result_view.png: a CounterfactualResult's HTML view (``to_html``), rendered by headless Chromium.

    python docs/_static/result_view.py          # from the repository root; needs the embedded model and chromium

Two results on the embedded model: the catalogue's landmark patch (Eiffel Tower
-> Colosseum at layer 24, the last prompt position) and the steering vector, each
with the interventional baseline beside the noise-matched counterfactual.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cfgen

HERE = Path(__file__).resolve().parent


def main() -> int:
    model, tok = cfgen.load_default_model()
    patch = cfgen.catalogue.load("patch_landmark_city", model)
    prompt = "The Eiffel Tower is located in the city of"
    result = cfgen.generate(patch, tok, [prompt], sources=["The Colosseum is located in the city of"],
                            unit_locations={"sources->base": (9, 9)}, max_new_tokens=14, num_samples=4, seed=0,
                            temperature=0.7, interventional=True)
    steer = cfgen.catalogue.load("steering_dark", model)
    story = cfgen.generate(steer, tok, ["Once upon a time, in a small village,", "The weather this morning"],
                           max_new_tokens=16, num_samples=2, seed=1, temperature=0.7, interventional=True)
    page = ("<html><head><meta charset='utf-8'><title>cfgen result view</title></head>"
            "<body style='margin:16px;background:#fff'>"
            f"<h3 style='font-family:sans-serif'>Landmark patch (layer 24)</h3>{result.to_html()}"
            f"<h3 style='font-family:sans-serif'>Steering vector</h3>{story.to_html(max_rows=3)}</body></html>")
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    if browser is None:
        print("no chromium (apt-get install chromium): nothing written", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "result_view.html"
        src.write_text(page, encoding="utf-8")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", "--window-size=1200,1060",
                        f"--screenshot={HERE / 'result_view.png'}", src.as_uri()],
                       check=True, capture_output=True)
    print(f"wrote {HERE / 'result_view.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
