"""Peak memory of concurrent image decodes, side by side in one run: no budget vs the decode budget.

Eight threads each decode one large PNG (``--side`` x ``--side``, under the 40M pixel limit), as
the ingest stage's fetch pool does with ``probe_image``. Each mode runs in a fresh process and
reports its peak RSS (sampled every 5 ms from /proc/self/statm) above its baseline:

- ``unbounded``: ``Image.open(...).load()`` directly (what ``probe_image`` did before the budget);
- ``budget_default``: ``probe_image`` with the default 1 GiB budget;
- ``budget_512m``: ``probe_image`` with a 512 MiB budget.

    flock /tmp/realsyn-bench.lock .venv/bin/python bench/bench_decode_memory.py
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time


def _rss_mib() -> float:
    """Current resident set size (sampled: ru_maxrss would keep the peak of reading the file)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0.0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.005)


def _child(mode: str, path: str, threads: int) -> None:
    from PIL import Image

    from realsyn.image_decode import probe_image, set_decode_budget

    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:  # warm up imports and plug-ins without decoding
        im.size  # noqa: B018
    if mode == "budget_512m":
        set_decode_budget(512 << 20)
    baseline = _rss_mib()
    barrier = threading.Barrier(threads)
    peak_reserved = []

    def work():
        barrier.wait()
        if mode == "unbounded":
            Image.MAX_IMAGE_PIXELS = None
            with Image.open(io.BytesIO(data)) as im:  # what probe_image did before: open, decode, close
                im.load()
        else:
            probe_image(data)

    sampler = _PeakSampler()
    sampler.start()
    started = time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    sampler.stop.set()
    sampler.join()
    from realsyn.image_decode import decode_budget

    peak_reserved.append(decode_budget().peak)
    print(
        json.dumps(
            {
                "mode": mode,
                "peak_rss_above_baseline_mib": round(sampler.peak - baseline, 1),
                "seconds": round(time.perf_counter() - started, 2),
                "budget_peak_mib": round(peak_reserved[0] / 2**20, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=6000, help="PNG side in pixels (6000^2 = 36M, under the 40M limit)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"))
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.threads)
        return
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # a gradient plus a little noise: compresses, but decodes to side*side*4 bytes like any photo
    ramp = np.linspace(0, 255, args.side, dtype=np.float32)
    pixels = (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.5 + rng.integers(0, 4, (args.side, args.side, 1))).astype(np.uint8)
    image = Image.fromarray(np.repeat(pixels, 3, axis=2), "RGB")
    with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
        image.save(f, format="PNG", compress_level=1)
        path = f.name
    del image, pixels
    per_image_mib = args.side * args.side * 4 / 2**20
    results = {}
    for mode in ("unbounded", "budget_default", "budget_512m"):
        out = subprocess.run(
            [sys.executable, __file__, "--threads", str(args.threads), "--child", mode, path], capture_output=True, text=True, check=True
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.threads} threads x one {args.side}x{args.side} PNG each ({per_image_mib:.0f} MiB decoded per image)")
    print(f"{'mode':<16} {'peak RSS MiB':>13} {'budget peak MiB':>16} {'seconds':>8}")
    for mode, r in results.items():
        print(f"{mode:<16} {r['peak_rss_above_baseline_mib']:>13} {r['budget_peak_mib']:>16} {r['seconds']:>8}")
    unbounded = results["unbounded"]["peak_rss_above_baseline_mib"]
    print(
        "RESULT "
        + " ".join(
            [
                f"side={args.side}",
                f"threads={args.threads}",
                f"unbounded_peak_mib={unbounded}",
                f"budget_1g_peak_mib={results['budget_default']['peak_rss_above_baseline_mib']}",
                f"budget_512m_peak_mib={results['budget_512m']['peak_rss_above_baseline_mib']}",
                f"ratio_512m_vs_unbounded={results['budget_512m']['peak_rss_above_baseline_mib'] / max(unbounded, 1e-9):.2f}",
                f"seconds_unbounded={results['unbounded']['seconds']}",
                f"seconds_512m={results['budget_512m']['seconds']}",
            ]
        )
    )


if __name__ == "__main__":
    main()
