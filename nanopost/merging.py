"""Weight fusion, one tensor at a time, with mergekit's semantics (the reference):

    linear            sum_i w_i theta_i / sum_i w_i            (normalize on; off: no division)
    slerp             spherical interpolation of two models, base at t=0 (whole tensor; or row by row)
    task_arithmetic   base + sum_i w_i (theta_i - base)        (normalize off by default)
    ties              trim deltas to the top-density magnitudes, elect a sign per element from the
                      sum of weighted deltas, average the deltas that agree with it (normalize on)
    dare_linear       randomly keep a density fraction of each delta, rescale it to the delta's L1 norm, sum
    dare_ties         DARE's drop and rescale, then TIES' sign election

rescale (on for DARE, off for TIES by default; mergekit since April 2024) scales a trimmed or dropped
delta so its L1 norm is the whole delta's (about 1/density on a large tensor, exactly so on none).

Also a safetensors writer that streams rows to disk (the reader is checkpoint.Reader), so merging
two 0.5B models holds a few tensors, not models."""
import json
import math
import re
import struct
import zlib

import torch

from nanopost.checkpoint import DTYPES, writing

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---- per-tensor operations (pure functions; the tests re-derive them in float64) ----

def linear(tensors, weights, normalize=True):
    out = sum(w * t for w, t in zip(weights, tensors))
    return out / sum(weights) if normalize else out


def slerp_coefficients(t: float, dot: float, dot_threshold=0.9995):
    """(c0, c1) so that SLERP = c0 * v0 + c1 * v1, given the cosine of the angle between them,
    or None where the tensors are nearly (anti)parallel: then SLERP falls back to linear
    interpolation, done as torch.lerp so that v0 == v1 gives v0 bit-exactly."""
    if abs(dot) > dot_threshold:
        return None
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def slerp_dot(sq0: float, sq1: float, dot01: float, eps=1e-8) -> float:
    """Cosine used by SLERP from the squared norms and the raw dot product; a tensor whose norm
    is <= eps is not normalised (as in mergekit)."""
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    return dot01 / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))


def slerp(t: float, v0, v1):
    """Whole-tensor SLERP (mergekit's, through 0.1.5, and most published SLERP merges): the angle between
    the flattened tensors, applied to the un-normalised tensors."""
    a, b = v0.double().flatten(), v1.double().flatten()
    c = slerp_coefficients(t, slerp_dot((a * a).sum().item(), (b * b).sum().item(), (a * b).sum().item()))
    return torch.lerp(v0, v1, t) if c is None else c[0] * v0 + c[1] * v1


def slerp_rows(t: float, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """Row-by-row SLERP (an option; no mergekit release merges so): each row of the leading axis on its own, dot
    clamped to [-1, 1]; 1-D tensors (biases, norms) fall back to linear interpolation."""
    if v0.dim() < 2:
        return torch.lerp(v0, v1, t)
    a, b = v0.flatten(1), v1.flatten(1)
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    a = torch.where(na > eps, a / na, a)
    b = torch.where(nb > eps, b / nb, b)
    dot = (a * b).sum(1, keepdim=True).clamp(-1, 1)
    theta = torch.arccos(dot)
    s = torch.sin(theta)
    lin = dot.abs() > dot_threshold
    s = torch.where(lin, torch.ones_like(s), s)
    out = (torch.sin((1 - t) * theta) / s) * v0.flatten(1) + (torch.sin(t * theta) / s) * v1.flatten(1)
    return torch.where(lin, torch.lerp(v0.flatten(1), v1.flatten(1), t), out).view_as(v0)


def masked(delta, keep, rescale: bool, eps=1e-7):
    """delta where keep, 0 elsewhere; rescale: times ||delta||_1 / ||kept||_1 (mergekit's L1 rescale;
    left as is when either norm is below eps)."""
    out = delta * keep
    if not rescale:
        return out
    before, after = delta.abs().sum(), out.abs().sum()
    return out if before < eps or after < eps else out * (before / after)


def trim_magnitude(delta, density: float, rescale=False):
    """Keep the int(density * numel) largest-magnitude entries (TIES' trim), zero the rest."""
    if density >= 1 or delta.numel() == 0:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        raise ValueError(f"density {density} keeps no element of a tensor with {delta.numel()} elements")
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.abs().flatten().float().topk(k).indices] = True
    return masked(delta, keep.view_as(delta), rescale)


def dare_drop(delta, density: float, gen: torch.Generator, rescale=True):
    """DARE: keep each entry with probability density (seeded); rescale: to the delta's L1 norm."""
    if density >= 1:
        return delta
    return masked(delta, torch.rand(delta.shape, generator=gen, dtype=torch.float32) < density, rescale)


def task_merge(base, tensors, weights, densities, method: str, normalize: bool, gen=None, rescale=None):
    """task_arithmetic / ties / dare_linear / dare_ties on one tensor (mergekit's GTA merge)."""
    deltas = []
    rescale = method.startswith("dare") if rescale is None else rescale
    for t, d in zip(tensors, densities):
        delta = t - base
        if method == "ties":
            delta = trim_magnitude(delta, d, rescale)
        elif method.startswith("dare"):
            delta = dare_drop(delta, d, gen, rescale)
        deltas.append(delta)
    wd = torch.stack([w * d for w, d in zip(weights, deltas)])
    w = torch.tensor(weights, dtype=wd.dtype).view(-1, *[1] * base.dim())
    if method in ("ties", "dare_ties"):
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0).to(wd.dtype)  # elected sign, ties go to +
        agree = (wd.sign() == sign).to(wd.dtype)
        mixed, divisor = (wd * agree).sum(0), (w * agree).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed, divisor = wd.sum(0), w.sum(0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return base + (mixed / divisor if normalize else mixed)


# ---- parameters that vary by tensor: numbers, gradients over depth, name filters ----

LAYER = re.compile(r"\.layers\.(\d+)\.")


def depth_position(name: str, n_layers: int) -> float:
    """Where a tensor sits in the stack, in [0, 1]: layer i -> i / (N - 1) (a lone layer -> 1), and
    the embedding, the final norm and lm_head -> 0, as mergekit's planner (>= 0.1.2; up to 0.1.1 it
    put the final norm and lm_head at 1)."""
    m = LAYER.search(name)
    if m:
        return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0
    return 0.0


FLAGS = ("normalize", "rescale", "int8_mask")  # a method's switches; read per tensor like the numbers


def resolve_param(spec, name: str, n_layers: int, what="t") -> float | None:
    """mergekit's evaluate_setting. spec: a number; a list of numbers (a gradient over depth: layer i
    gets the value interpolated at i/(N-1)); or a list of {"filter": substring, "value": ...} where
    the first entry whose filter is in the tensor's name, is "*" or is absent wins. None when no entry
    matches: the caller then reads the next level (a model's, the slice's, the global parameters)."""
    if isinstance(spec, bool) and what in FLAGS:  # true/false; a number counts as true unless 0
        return float(spec)
    if isinstance(spec, bool) or not isinstance(spec, (int, float, list)):
        raise ValueError(f"{what}: cannot read {spec!r:.80} (a number, a list of numbers, or a list of {{filter, value}} "
                         f"entries" + ("; mergekit, too, refuses a single {filter, value} not in a list)"
                                       if isinstance(spec, dict) else ")"))
    if isinstance(spec, (int, float)):
        return float(spec)
    if spec and all(isinstance(e, dict) for e in spec):
        for entry in spec:
            if "value" not in entry or set(entry) - {"filter", "value"}:
                raise ValueError(f"{what}: {entry!r:.80} is not a {{filter, value}} entry")
            if entry.get("filter") in (None, "*") or entry["filter"] in name:
                return resolve_param(entry["value"], name, n_layers, what)
        return None
    if spec and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
        if len(spec) == 1:
            return float(spec[0])
        x = depth_position(name, n_layers) * (len(spec) - 1)
        i = min(int(math.floor(x)), len(spec) - 2)
        return float(spec[i] + (x - i) * (spec[i + 1] - spec[i]))
    raise ValueError(f"{what}: cannot read {spec!r:.80} (a number, a list of numbers, or a list of {{filter, value}} entries)")


# ---- safetensors streaming I/O ----

class Writer:
    """Writes one safetensors file whose tensor list is known up front: the header first, then
    each tensor's bytes as they are produced, in order (rows can arrive in chunks)."""

    def __init__(self, path: str, entries: list[tuple[str, tuple, torch.dtype]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in entries:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
        self.path, self.f = path, open(path, "wb")
        with writing(path):
            self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.size = offset

    def write(self, t: torch.Tensor):
        with writing(self.path):
            self.f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    def close(self):
        with writing(self.path):
            self.f.close()


def crc_seed(seed: int, *parts) -> int:
    """A stable per-tensor seed, so DARE's masks do not depend on tensor order (the models' masks
    are drawn from it one after another, in --models order)."""
    return (seed * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % (2**63)
