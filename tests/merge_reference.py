"""A small, independent, test-only implementation of the TIES formulas.

Written straight from the issue's definitions on whole flattened vectors (the
authors' layout), with none of trainkit.merge's code: kthvalue on the
concatenated task vector, torch.sign, torch.where, in-order sums.
"""

from __future__ import annotations

import torch


def _groups(keys, scope):
    return [list(keys)] if scope == "global" else [[k] for k in keys]


def _in_order_sum(rows):
    acc = rows[0].clone()
    for r in rows[1:]:
        acc = acc + r
    return acc


def ref_ties(base, models, density, lam=1.0, scope="global", weights=None):
    keys = list(base)
    dt = torch.float64 if any(base[k].dtype == torch.float64 for k in keys) else torch.float32
    weights = weights or [1.0] * len(models)
    out = {}
    for group in _groups(keys, scope):
        b = torch.cat([base[k].to(dt).reshape(-1) for k in group])
        tvs = []
        for m, w in zip(models, weights):
            tv = torch.cat([m[k].to(dt).reshape(-1) for k in group]) - b
            tvs.append(tv * w if w != 1.0 else tv)
        d = b.numel()
        k = d - int(d * density)
        if k > 0:
            tvs = [tv * (tv.abs() >= tv.abs().kthvalue(k).values) for tv in tvs]
        s = _in_order_sum(tvs)
        sign = torch.sign(s)
        majority = torch.sign(sign.sum())
        sign[sign == 0] = majority
        agree = [torch.where(sign > 0, tv > 0, tv < 0) for tv in tvs]
        total = _in_order_sum([tv * a for tv, a in zip(tvs, agree)])
        count = _in_order_sum([a.to(dt) for a in agree])
        merged = b + lam * (total / count.clamp(min=1))
        off = 0
        for name in group:
            n = base[name].numel()
            out[name] = merged[off : off + n].reshape(base[name].shape).to(base[name].dtype)
            off += n
    return out


def ref_mergekit_ties(base, models, density, lam=1.0, weights=None, dtype=torch.float32):
    """mergekit 0.1.5's ties per tensor: argsort exact-k trim (torch's unstable tie order, on |delta| in
    float32), weights, vote (>= 0 is +); every op in ``dtype`` (mergekit's ``dtype:``), the result in it."""
    weights = weights or [1.0] * len(models)
    out = {}
    for name, b0 in base.items():
        b = b0.to(dtype)
        deltas = []
        for m in models:
            delta = m[name].to(dtype) - b
            if density < 1:
                k = max(1, int(density * delta.numel()))
                mask = torch.zeros(delta.numel(), dtype=dtype)
                mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
                delta = delta * mask.reshape(delta.shape)
            deltas.append(delta)
        deltas = torch.stack(deltas)
        w = torch.tensor(weights, dtype=dtype).reshape(-1, *([1] * b.dim()))
        deltas = deltas * w
        majority = (deltas.sum(0) >= 0).to(dtype) * 2 - 1
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
        if lam != 1:
            mixed = mixed * lam
        out[name] = (b + mixed).to(b0.dtype if dtype == torch.float32 else dtype)
    return out


def ref_mergekit_dare_linear(base, models, density, seed, weights=None):
    """mergekit 0.1.5's dare_linear (``--random-seed seed``): one generator seeded once, tensors in
    sorted name order, models in order, a Bernoulli(density) mask per model, L1 rescale, weighted sum."""
    weights = weights or [1.0] * len(models)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(base):
        b = base[name].to(torch.float32)
        mixed = torch.zeros_like(b)
        for m, w in zip(models, weights):
            delta = m[name].to(torch.float32) - b
            mask = torch.bernoulli(torch.full(delta.shape, density), generator=g)
            kept = delta * mask
            l1_before, l1_after = delta.abs().sum(), kept.abs().sum()
            if l1_before >= 1e-7 and l1_after >= 1e-7:
                kept = kept * (l1_before / l1_after)
            mixed = mixed + kept * w
        out[name] = (b + mixed).to(base[name].dtype)
    return {k: out[k] for k in base}
