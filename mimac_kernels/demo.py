"""A one-minute look at the fused loss: value, time and peak memory against plain PyTorch.

Run ``python -m mimac_kernels.demo [--rows M] [--dim D]``. Each provider runs
one forward + backward of NT-Xent (cosine, tau = 0.1) on the same random views,
timed in this process and memory-probed in a fresh one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from mimac_kernels import available_backends, fused_contrastive_loss, reference_contrastive_loss


def peak_rss_mb(code: str, timeout: float = 600.0) -> float:
    """Peak resident memory (MiB) of a fresh Python process running ``code``.

    Each measurement gets its own process, so earlier allocations in the caller
    cannot hide or inflate it. It reads ``VmHWM`` (KiB) from ``/proc/self/status``:
    unlike ``ru_maxrss``, which survives ``exec`` and so reports the parent's peak
    when the parent was larger, it belongs to the new process image alone. Linux only.
    The probe runs with glibc's mmap threshold fixed at its 128 KiB default: left
    dynamic, it rises after the first large free and later buffers of a few MiB stay
    on the heap, so the peak would count what the allocator keeps (±20 MiB from run to
    run for a 4 MiB block loop) rather than what the code holds.
    """
    probe = code + (
        "\nfor _l in open('/proc/self/status'):\n"
        "    if _l.startswith('VmHWM:'): print('PEAK_KB', _l.split()[1])\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout,
        check=False, env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-2000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK_KB")][-1]
    return int(line.split()[1]) / 1024.0


def loss_memory_code(n: int, d: int, provider: str, critic: str = "cosine", seed: int = 0) -> str:
    """Source of a probe that allocates ``(n, d)`` views and, unless ``provider`` is
    ``"inputs"``, runs one forward + backward of the loss (``"plain"``: the full-matrix
    loss in float32, or a backend name)."""
    setup = (
        "import torch, mimac_kernels\n"
        "torch.set_num_threads(1)\n"  # thread pools would add per-thread noise
        f"g = torch.Generator().manual_seed({seed})\n"
        f"a = torch.randn({n}, {d}, generator=g).requires_grad_()\n"
        f"b = torch.randn({n}, {d}, generator=g).requires_grad_()\n"
        "x = (a.sum() + b.sum()).item()\n"  # touch the pages so the baseline counts them
    )
    if provider == "inputs":
        return setup
    if provider == "plain":
        call = (
            f"mimac_kernels.reference_contrastive_loss(a, b, temperature=0.1, critic={critic!r}, "
            "dtype=None)"
        )
    else:
        call = (
            f"mimac_kernels.fused_contrastive_loss(a, b, temperature=0.1, critic={critic!r}, "
            f"backend={provider!r})"
        )
    return setup + f"loss = {call}\nloss.backward()\n"


def _time_fwd_bwd(fn, a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> tuple[float, float]:
    """(loss value, median seconds of forward + backward)."""
    times, value = [], float("nan")
    for _ in range(repeats):
        a.grad = b.grad = None
        t0 = time.perf_counter()
        loss = fn(a, b)
        loss.backward()
        times.append(time.perf_counter() - t0)
        value = float(loss.detach())
    return value, sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192, help="M = 2N rows (default 8192)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory probes")
    args = p.parse_args(argv)
    n, d = args.rows // 2, args.dim
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g).requires_grad_()
    b = torch.randn(n, d, generator=g).requires_grad_()
    providers = {
        "plain": lambda x, y: reference_contrastive_loss(x, y, temperature=0.1, dtype=None)
    }
    for name in available_backends("cpu"):
        if name != "triton":  # on CPU Triton only runs in its (slow) interpreter
            providers[name] = lambda x, y, name=name: fused_contrastive_loss(
                x, y, temperature=0.1, backend=name
            )
    base = None if args.no_memory else peak_rss_mb(loss_memory_code(n, d, "inputs"))
    print(f"NT-Xent, cosine, tau=0.1, M={2 * n} rows, D={d}, float32, CPU, torch {torch.__version__}")
    print(f"{'provider':>8} {'loss':>10} {'fwd+bwd s':>10} {'peak MiB':>9}")
    for name, fn in providers.items():
        value, secs = _time_fwd_bwd(fn, a, b)
        mem = "-" if base is None else f"{peak_rss_mb(loss_memory_code(n, d, name)) - base:.0f}"
        print(f"{name:>8} {value:10.6f} {secs:10.3f} {mem:>9}")


if __name__ == "__main__":
    main()
