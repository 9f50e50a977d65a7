"""Peak memory of ``fluency run`` at two stimulus-set sizes (issue 16, point 1).

    python benchmarks/bench_memory.py [--sizes 10000 100000] [--image-size 64] [--json]
    python benchmarks/bench_memory.py --sizes 1000 10000 --image-size 224 --model vae-vgg16 --store-layers pool5

For each size, N generated, rated 64×64 images are written as PNG files and ``fluency run --metric gini
--metric lepsilon`` runs on them as a user runs it (store, analyses, figures, report) in a fresh
process; its peak resident set size (``VmHWM``) is read by that process at exit. The ratio of the
larger size's peak to the smaller's is the figure (target: below 1.10 from 10,000 to 100,000 images).
``--model NAME`` measures an untrained architecture at ``--image-size`` instead of the shipped model; a
store of ``vae-vgg16``'s five blocks at 224² is ~12 MB per image, so that run keeps one layer
(``--store-layers``) or none (``--no-store``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: runs the CLI in this process and prints its peak RSS in KiB on the last line: VmHWM of /proc/self/status
#: (this process's own memory map), where there is one; ``ru_maxrss`` keeps the peak of the process that
#: started this one (a fork copies it, exec does not reset it), so it is only the fallback
PROBE = """
import resource, sys
from fluency.cli import main
sys.argv = ["fluency", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
else:
    code = 0
try:
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak)
sys.exit(code)
"""


def peak_rss(folder: Path, images: int, image_size: int, model: str | None = None,
             store: list[str] | None = None) -> dict[str, float]:
    """Peak RSS (MiB), seconds and the manifest's step timings of one ``fluency run`` on ``images`` images
    (``model``: an untrained architecture at ``image_size``; ``store``: extra arguments of the store)."""
    from fluency.core.inputs import demo

    stimuli = demo.export(folder / f"stimuli-{images}", n=images, size=image_size, seed=0)
    argv = ["run", "--metric", "gini", "--metric", "lepsilon", "--images", str(stimuli / "images"),
            "--ratings", str(stimuli / "ratings.csv"), "--out", str(folder / f"run-{images}"), *(store or [])]
    if model:
        argv += ["--model", model, "-o", f"{model}.image_size={image_size}"]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"fluency run on {images} images failed:\n{done.stderr[-2000:]}")
    manifest = json.loads((folder / f"run-{images}" / "manifest.json").read_text())
    return {"images": images, "peak_rss_mib": int(done.stdout.strip().splitlines()[-1]) / 1024, "seconds": seconds,
            "timings": manifest["timings"], "stored_layers": {label: store["layers"] for label, store
                                                              in (manifest.get("stores") or {}).items()}}


def measure(sizes: tuple[int, int] = (10000, 100000), image_size: int = 64, model: str | None = None,
            store: list[str] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [peak_rss(Path(tmp), n, image_size, model, store) for n in sizes]
    return {"runs": runs, "growth": runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]}


def table(m: dict[str, Any]) -> str:
    lines = [f"{'images':>8}{'peak RSS MiB':>14}{'seconds':>10}{'analyses s':>12}{'report s':>10}"]
    lines += [f"{r['images']:>8}{r['peak_rss_mib']:>14.0f}{r['seconds']:>10.1f}{r['timings'].get('analyses', 0):>12.1f}"
              f"{r['timings'].get('report', 0):>10.1f}" for r in m["runs"]]
    lines.append(f"growth {m['growth']:.3f}× (target < 1.10)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=(10000, 100000))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--model", default=None, help="an architecture, built untrained (default: shipped model)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--store-layers", default=None, help="the layers kept in the activation store")
    where.add_argument("--no-store", action="store_true", help="no activation store")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    store = ["--no-store"] if args.no_store else ["--store-layers", args.store_layers] if args.store_layers else []
    m = measure(tuple(args.sizes), args.image_size, args.model, store)
    print(json.dumps(m, indent=1) if args.json else table(m))


if __name__ == "__main__":
    main()
