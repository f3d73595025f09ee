"""Benchmark capsmed's capsule layers against reference layers written the way public code writes them.

Cases (forward + backward, gradients for the input and every parameter):

* ``conv3d``: ConvCapsule 3D, input 2 x 16 capsules x 4 dims at 32^3, 16 output capsules x 8 dims,
  kernel 3, stride 2, padding 1, 3 routing iterations, cosine agreement. Reference: 3D-UCaps'
  ``ConvSlimCapsule3D`` + ``_update_routing`` (one shared ``nn.Conv3d``, the votes tensor
  materialised, ``F.softmax`` over J, ``F.cosine_similarity``, standard autograd).
* ``dense``: DenseCapsule 64 x 1152 x 8 -> 10 x 16, 3 iterations, dot agreement. Reference: the
  common port (XifengGuo's CapsNet-Pytorch layout) with ``W`` of shape ``(1, I, J, Dout, Din)``,
  a broadcast ``matmul`` making the full votes tensor, softmax over J, standard autograd.
* ``dense_detached``: the same with stop-gradient through the routing logits (XifengGuo's
  ``x_hat_detached``) against ``DenseCapsule(detach_logits=True)``.
* ``em_conv2d``: ConvMatrixCapsule 2D (EM routing), 4 x 16 matrix capsules at 14^2 -> 16 types,
  kernel 3, stride 2 (the paper's ConvCaps1 at half width), 3 EM iterations. Reference: the same
  math written as the public PyTorch port does (yl-1993/Matrix-Capsules-EM-PyTorch: windows by
  index lists, poses ``repeat``-ed and multiplied by ``matmul`` of 4x4 matrices, a plain loop of
  broadcast E and M steps, standard autograd), with Gritzman's schedule and cost scale.
* ``em_class``: ClassMatrixCapsule (coordinate addition), 32 x 16 types at 4^2 -> 10 classes,
  3 EM iterations; reference as above with the weights ``repeat``-ed over positions.

Timing: both implementations get the same weights and input; repeats are interleaved (alternating
which goes first), each repeat is one forward + backward of ``(out * seed).sum()``; the table shows
medians and the ratio of medians. Outputs and gradients are compared before timing.

Peak memory (CPU): each implementation runs in its own fresh subprocess: one warm-up forward +
backward, then ``gc.collect()`` and glibc ``malloc_trim(0)``, then the kernel's peak-RSS counter is
reset (``/proc/self/clear_refs`` <- 5) and the measured forward + backward runs. Reported is
``VmHWM - VmRSS(before)``: the real resident memory the step added at its peak (tensors, autograd
buffers, oneDNN scratch space), in MiB. Where the peak counter cannot be reset, the script falls back
to ``ru_maxrss`` minus the RSS before the first (unwarmed) run, and says so. On CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before the step.

Usage::

    .venv/bin/python benchmarks/bench_layers.py                 # all cases, 7 repeats
    .venv/bin/python benchmarks/bench_layers.py --cases dense --repeats 3 --no-memory
    .venv/bin/python benchmarks/bench_layers.py --threads 1 2   # time at 1 and at 2 threads
    python3 benchmarks/bench_layers.py --device cuda            # on a GPU machine

Writes ``benchmarks/out/bench_layers_<device>.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capsmed.layers import (  # noqa: E402
    ClassMatrixCapsule,
    ConvCapsule,
    ConvMatrixCapsule,
    DenseCapsule,
)

OUT_DIR = ROOT / "benchmarks" / "out"


# ----------------------------------------------------------------------------- reference layers
def _ucaps_squash(input_tensor, dim=2):
    # 3D-UCaps layers.py
    epsilon = 1e-12
    norm = torch.linalg.norm(input_tensor, dim=dim, keepdim=True)
    norm_squared = norm * norm
    return (input_tensor / (norm + epsilon)) * (norm_squared / (1 + norm_squared))


def _ucaps_update_routing(votes, biases, num_routing):
    # 3D-UCaps layers.py: votes (B, I, J, D, *S), softmax over J, cosine agreement
    votes_shape = votes.size()
    logits_shape = list(votes_shape)
    logits_shape[3] = 1
    logits = torch.zeros(logits_shape, requires_grad=False, device=votes.device)
    for i in range(num_routing):
        route = F.softmax(logits, dim=2)
        preactivate = torch.sum(votes * route, dim=1) + biases[None, ...]
        if i + 1 < num_routing:
            distances = F.cosine_similarity(preactivate[:, None, ...], votes, dim=3)
            logits = logits + distances[:, :, :, None, ...]
        else:
            activation = _ucaps_squash(preactivate)
    return activation


class UCapsConvCapsule3D(nn.Module):
    """3D-UCaps' ConvSlimCapsule3D (shared weights): one Conv3d, votes materialised, cosine routing."""

    def __init__(self, input_dim, output_dim, input_atoms, output_atoms, kernel_size, stride,
                 padding, num_routing):
        super().__init__()
        self.input_dim, self.output_dim = input_dim, output_dim
        self.input_atoms, self.output_atoms = input_atoms, output_atoms
        self.num_routing = num_routing
        self.biases = nn.Parameter(torch.full((output_dim, output_atoms, 1, 1, 1), 0.1))
        self.conv3d = nn.Conv3d(input_atoms, output_dim * output_atoms, kernel_size, stride=stride,
                                padding=padding)
        nn.init.normal_(self.conv3d.weight, std=0.1)

    def forward(self, input_tensor):
        s = input_tensor.size()
        x = input_tensor.view(s[0] * self.input_dim, self.input_atoms, s[-3], s[-2], s[-1])
        conv = self.conv3d(x)
        c = conv.size()
        votes = conv.view(s[0], self.input_dim, self.output_dim, self.output_atoms,
                          c[-3], c[-2], c[-1])
        return _ucaps_update_routing(votes, self.biases, self.num_routing)


def _port_squash(inputs, axis=-1):
    # XifengGuo CapsNet-Pytorch capsulelayers.squash
    norm = torch.norm(inputs, p=2, dim=axis, keepdim=True)
    scale = norm**2 / (1 + norm**2) / (norm + 1e-8)
    return scale * inputs


class PortDenseCapsule(nn.Module):
    """Common public port: W (1, I, J, Dout, Din), broadcast matmul, softmax over J, autograd."""

    def __init__(self, in_num_caps, in_dim_caps, out_num_caps, out_dim_caps, routings=3,
                 detach=False):
        super().__init__()
        self.routings = routings
        self.detach = detach
        self.weight = nn.Parameter(
            0.01 * torch.randn(1, in_num_caps, out_num_caps, out_dim_caps, in_dim_caps))

    def forward(self, x):
        x_hat = torch.matmul(self.weight, x[:, :, None, :, None]).squeeze(-1)  # (B, I, J, Dout)
        x_hat_detached = x_hat.detach() if self.detach else x_hat
        b = torch.zeros(x_hat.shape[:3], device=x.device)
        for i in range(self.routings):
            c = F.softmax(b, dim=2)
            if i == self.routings - 1:
                outputs = _port_squash(torch.sum(c[:, :, :, None] * x_hat, dim=1))
            else:
                outputs = _port_squash(torch.sum(c[:, :, :, None] * x_hat_detached, dim=1))
                b = b + torch.sum(outputs[:, None] * x_hat_detached, dim=-1)
        return outputs  # (B, J, Dout)


def _port_em(v, a_in, beta_u, beta_a, iters, final_lambda=0.01, eps=1e-9):
    # plain EM loop, broadcast E and M steps (yl-1993 layout), Gritzman's lambda and cost scale.
    # v (b, I, J, 16), a_in (b, I, 1) -> mu (b, J, 16), a (b, J)
    b, n_in, n_out, _ = v.shape
    scale = 100.0 * n_out / n_in
    r = torch.full((b, n_in, n_out), 1.0 / n_out, device=v.device, dtype=v.dtype)
    for it in range(iters):
        lam = final_lambda * (1 - 0.95 ** (it + 1))
        rr = (r * a_in).unsqueeze(-1)
        r_sum = rr.sum(dim=1, keepdim=True)
        mu = (rr * v).sum(dim=1, keepdim=True) / (r_sum + eps)
        var = (rr * (v - mu) ** 2).sum(dim=1, keepdim=True) / (r_sum + eps) + eps
        cost = ((beta_u.view(1, 1, n_out, 1) + 0.5 * torch.log(var)) * r_sum * scale).sum(
            dim=3, keepdim=True)
        a_out = torch.sigmoid(lam * (beta_a.view(1, 1, n_out, 1) - cost))
        if it < iters - 1:
            ln_p = -((v - mu) ** 2) / (2 * var) - 0.5 * torch.log(2 * math.pi * var)
            ln_ap = ln_p.sum(dim=3) + torch.log(a_out.view(b, 1, n_out) + eps)
            r = F.softmax(ln_ap, dim=2)
    return mu.squeeze(1), a_out.view(b, n_out)


def _unpack(x):
    # benchmark input (B, I, 17, *S): 16 pose entries and an activation logit per capsule
    return x[:, :, :16], torch.sigmoid(x[:, :, 16])


def _pack(poses, acts):
    return torch.cat([poses, acts.unsqueeze(2)], dim=2)


class PortConvMatrixCapsule2D(nn.Module):
    """yl-1993-style ConvCaps: index-list unfold, repeat + 4x4 matmul votes, plain EM loop."""

    def __init__(self, n_in, n_out, k, stride, iters):
        super().__init__()
        self.n_in, self.n_out, self.k, self.stride, self.iters = n_in, n_out, k, stride, iters
        self.weight = nn.Parameter(torch.randn(1, k * k * n_in, n_out, 4, 4))
        self.beta_u = nn.Parameter(torch.zeros(n_out))
        self.beta_a = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        poses, acts = _unpack(x)
        b, i, _, h, w = poses.shape
        k, s, j = self.k, self.stride, self.n_out
        x = torch.cat([poses.permute(0, 3, 4, 1, 2).reshape(b, h, w, i * 16),
                       acts.permute(0, 2, 3, 1)], dim=3)  # (b, h, w, I*16 + I)
        idxs = [[r + kk for kk in range(k)] for r in range(0, h - k + 1, s)]
        x = x[:, idxs, :, :]
        idxs = [[c + kk for kk in range(k)] for c in range(0, w - k + 1, s)]
        x = x[:, :, :, idxs, :].permute(0, 1, 3, 2, 4, 5).contiguous()  # (b, oh, ow, k, k, c)
        oh, ow = x.shape[1], x.shape[2]
        p = x[..., : i * 16].reshape(b * oh * ow, k * k * i, 1, 4, 4).repeat(1, 1, j, 1, 1)
        a = x[..., i * 16:].reshape(b * oh * ow, k * k * i, 1)
        v = torch.matmul(p, self.weight).view(b * oh * ow, k * k * i, j, 16)
        mu, a_out = _port_em(v, a, self.beta_u, self.beta_a, self.iters)
        mu = mu.view(b, oh, ow, j, 16).permute(0, 3, 4, 1, 2)
        return _pack(mu, a_out.view(b, oh, ow, j).permute(0, 3, 1, 2))


class PortClassMatrixCapsule2D(nn.Module):
    """yl-1993-style class capsules: weights repeat-ed over positions, coordinate addition, EM."""

    def __init__(self, n_in, n_out, iters):
        super().__init__()
        self.n_in, self.n_out, self.iters = n_in, n_out, iters
        self.weight = nn.Parameter(torch.randn(1, n_in, n_out, 4, 4))
        self.beta_u = nn.Parameter(torch.zeros(n_out))
        self.beta_a = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        poses, acts = _unpack(x)
        b, i, _, h, w = poses.shape
        j = self.n_out
        p = poses.permute(0, 3, 4, 1, 2).reshape(b, h * w * i, 1, 4, 4).repeat(1, 1, j, 1, 1)
        wt = self.weight.repeat(1, h * w, 1, 1, 1)
        v = torch.matmul(p, wt).view(b, h, w, i, j, 16)
        coord = torch.zeros(h, w, 16)
        coord[:, :, 3] = ((torch.arange(w) + 0.5) / w).view(1, w)
        coord[:, :, 7] = ((torch.arange(h) + 0.5) / h).view(h, 1)
        v = (v + coord.view(1, h, w, 1, 1, 16)).view(b, h * w * i, j, 16)
        a = acts.permute(0, 2, 3, 1).reshape(b, h * w * i, 1)
        mu, a_out = _port_em(v, a, self.beta_u, self.beta_a, self.iters)
        return _pack(mu, a_out)


class _PackedEM(nn.Module):
    """Ours behind the benchmark's one-tensor interface."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return _pack(*self.layer(*_unpack(x)))


# ----------------------------------------------------------------------------- cases
def build_case(name: str, device: str):
    """Return (ours, reference, input) with identical weights."""
    torch.manual_seed(0)
    if name == "conv3d":
        ref = UCapsConvCapsule3D(16, 16, 4, 8, kernel_size=3, stride=2, padding=1, num_routing=3)
        with torch.no_grad():
            ref.conv3d.bias.zero_()  # kept (as in 3D-UCaps) but zero, so outputs can be compared
        ours = ConvCapsule(3, 16, 4, 16, 8, kernel_size=3, stride=2, padding=1,
                           routing_iterations=3, agreement="cosine", shared_votes=True)
        with torch.no_grad():
            ours.conv.weight.copy_(ref.conv3d.weight)
            ours.bias.copy_(ref.biases.view(16, 8))
        x = torch.randn(2, 16, 4, 32, 32, 32)
        x = x / x.norm(dim=2, keepdim=True) * 0.5  # squashed-like input capsules
    elif name in ("dense", "dense_detached"):
        detach = name == "dense_detached"
        ref = PortDenseCapsule(1152, 8, 10, 16, routings=3, detach=detach)
        ours = DenseCapsule(1152, 8, 10, 16, routing_iterations=3, detach_logits=detach)
        with torch.no_grad():
            ours.weight.copy_(ref.weight[0])
        x = torch.rand(64, 1152, 8) * 0.3
    elif name in ("em_conv2d", "em_class"):
        if name == "em_conv2d":
            ref = PortConvMatrixCapsule2D(16, 16, 3, 2, 3)
            layer = ConvMatrixCapsule(2, 16, 16, kernel_size=3, stride=2, routing_iterations=3)
            x = torch.randn(4, 16, 17, 14, 14)
        else:
            ref = PortClassMatrixCapsule2D(32, 10, 3)
            layer = ClassMatrixCapsule(2, 32, 10, routing_iterations=3)
            x = torch.randn(32, 32, 17, 4, 4)
        with torch.no_grad():
            layer.weight.copy_(ref.weight[0])
            ref.beta_u.copy_(layer.beta_u)
            ref.beta_a.copy_(layer.beta_a)
        ours = _PackedEM(layer)
        x[:, :, :16] *= 0.5
    else:
        raise ValueError(f"unknown case {name!r}")
    return ours.to(device), ref.to(device), x.to(device)


def step(module, x, seed):
    """One forward + backward; returns the output (detached)."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    out = module(x)
    (out * seed).sum().backward()
    return out.detach(), x.grad


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def compare(ours, ref, x, device):
    """Max abs differences of output, input gradient and weight gradient."""
    torch.manual_seed(1)
    out_o, gx_o = step(ours, x, torch.ones(1, device=device))
    seed = torch.randn_like(out_o)
    out_o, gx_o = step(ours, x, seed)
    w_o = next(p for n, p in ours.named_parameters() if "weight" in n).grad
    out_r, gx_r = step(ref, x, seed)
    w_r = next(p for n, p in ref.named_parameters() if "weight" in n).grad
    rel = lambda a, b: float((a - b.view_as(a)).abs().max() / b.abs().max().clamp_min(1e-30))  # noqa: E731
    return {
        "output_max_abs_diff": float((out_o - out_r).abs().max()),
        "input_grad_max_rel_diff": rel(gx_o, gx_r),
        "weight_grad_max_rel_diff": rel(w_o, w_r),
    }, seed


def time_case(ours, ref, x, seed, repeats, device):
    times = {"ours": [], "reference": []}
    mods = {"ours": ours, "reference": ref}
    for name in ("ours", "reference"):  # warm-up
        step(mods[name], x, seed)
    for r in range(repeats):
        order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
        for name in order:
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            step(mods[name], x, seed)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- memory
def _status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory_child(case: str, impl: str, device: str) -> dict:
    """Peak extra memory of one forward + backward (run in a fresh process)."""
    ours, ref, x = build_case(case, device)
    module = ours if impl == "ours" else ref
    torch.manual_seed(1)
    with torch.no_grad():
        seed = torch.randn_like(module(x))
    if device == "cuda":
        step(module, x, seed)
        for p in module.parameters():
            p.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(module, x, seed)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": (peak - before) / 2**20, "method": "cuda max_memory_allocated"}
    try:
        step(module, x, seed)
        for p in module.parameters():
            p.grad = None
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_mib("VmRSS")
        step(module, x, seed)
        peak = _status_mib("VmHWM")
        return {"peak_mib": peak - before, "method": "VmHWM - VmRSS after warm-up (clear_refs)"}
    except OSError:
        before = _status_mib("VmRSS")
        step(module, x, seed)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"peak_mib": peak - before, "method": "ru_maxrss - VmRSS, unwarmed fresh process"}


def measure_memory(case: str, impl: str, device: str, threads: int, repeats: int) -> dict:
    vals, method = [], None
    for _ in range(repeats):
        cmd = [sys.executable, __file__, "--memory-child", case, impl, "--device", device,
               "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        vals.append(rec["peak_mib"])
        method = rec["method"]
    return {"peak_mib": statistics.median(vals), "runs": vals, "method": method}


# ----------------------------------------------------------------------------- main
def machine_info(device: str) -> dict:
    info = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu_model"] = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
            platform.processor(),
        )
    except OSError:
        info["cpu_model"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["loadavg_start"] = os.getloadavg()
    return info


CASE_TITLES = {
    "conv3d": "ConvCapsule 3D, 2x16x4 @32^3 -> 16x8, s2, 3 it, cosine",
    "dense": "DenseCapsule 64x1152x8 -> 10x16, 3 it",
    "dense_detached": "DenseCapsule 64x1152x8 -> 10x16, 3 it, detached logits",
    "em_conv2d": "ConvMatrixCapsule 2D, 4x16 @14^2 -> 16, k3 s2, 3 EM it",
    "em_class": "ClassMatrixCapsule 32x32 @4^2 -> 10, coord. add., 3 EM it",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASE_TITLES),
                    choices=list(CASE_TITLES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch intra-op thread counts to time (default: torch's default); memory "
                         "is measured with the first")
    ap.add_argument("--memory-repeats", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    thread_counts = args.threads or [torch.get_num_threads()]
    if args.memory_child:
        torch.set_num_threads(thread_counts[0])
        print(json.dumps(memory_child(*args.memory_child, args.device)))
        return 0

    info = machine_info(args.device)
    results = []
    for case in args.cases:
        rec: dict = {"case": case, "title": CASE_TITLES[case], "timing": []}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            ours, ref, x = build_case(case, args.device)
            check, seed = compare(ours, ref, x, args.device)
            rec.setdefault("check", check)
            times = time_case(ours, ref, x, seed, args.repeats, args.device)
            med = {k: statistics.median(v) for k, v in times.items()}
            rec["timing"].append({"threads": threads, "times_s": times, "median_s": med,
                                  "speedup": med["reference"] / med["ours"],
                                  "loadavg": os.getloadavg()})
            del ours, ref, x
            gc.collect()
            print(f"[{case}, {threads} threads] speedup {med['reference'] / med['ours']:.1f}x",
                  file=sys.stderr, flush=True)
        if not args.no_memory:
            mem = {impl: measure_memory(case, impl, args.device, thread_counts[0],
                                        args.memory_repeats)
                   for impl in ("ours", "reference")}
            rec["memory"] = mem
            rec["memory_ratio"] = mem["ours"]["peak_mib"] / mem["reference"]["peak_mib"]
        results.append(rec)
    info["loadavg_end"] = os.getloadavg()

    cpu = f"{info['cpu_model']} ({info['cpu_count']} cores)"
    dev = info.get("gpu") if args.device == "cuda" else cpu
    print(f"\nDevice: {dev}; torch {info['torch']}; {info['date']}; forward + backward, median of "
          f"{args.repeats} interleaved repeats; load average at start {info['loadavg_start'][0]:.1f}\n")
    print("| case | threads | reference s | ours s | speedup |")
    print("|---|---|---|---|---|")
    for r in results:
        for t in r["timing"]:
            print(f"| {r['title']} | {t['threads']} | {t['median_s']['reference']:.3f} | "
                  f"{t['median_s']['ours']:.3f} | {t['speedup']:.1f}x |")
    if not args.no_memory:
        method = results[0]["memory"]["ours"]["method"]
        print(f"\nPeak memory of one forward + backward, MiB ({method}; {thread_counts[0]} threads)\n")
        print("| case | reference | ours | ours / reference |")
        print("|---|---|---|---|")
        for r in results:
            m = r["memory"]
            print(f"| {r['title']} | {m['reference']['peak_mib']:.0f} | {m['ours']['peak_mib']:.0f} | "
                  f"{r['memory_ratio']:.2f} |")
    print("\nAgreement with the reference (same weights and input)\n")
    print("| case | max abs output diff | max rel diff input grad | max rel diff weight grad |")
    print("|---|---|---|---|")
    for r in results:
        c = r["check"]
        print(f"| {r['title']} | {c['output_max_abs_diff']:.1e} | {c['input_grad_max_rel_diff']:.1e} "
              f"| {c['weight_grad_max_rel_diff']:.1e} |")
    out = args.out or OUT_DIR / f"bench_layers_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "repeats": args.repeats, "results": results},
                              indent=2))
    print(f"\nJSON: {out}")
    ok = all(r["check"]["output_max_abs_diff"] <= 1e-5 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
