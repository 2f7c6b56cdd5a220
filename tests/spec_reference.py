"""An independent, deliberately plain implementation of the profiles' rules (docs/profiles.md), written
from that text alone, used as the oracle for random traces. It shares no code with the service."""

from __future__ import annotations

import math
from typing import Any


def reference_replay(header: dict[str, Any], events: list[dict[str, Any]], profile: str, **params: Any) -> list[dict[str, Any]]:
    mods = header["modalities"]
    ref = params.get("reference_modality") or header.get("reference_modality") or mods[0]
    K = params.get("threshold", 0.04 if profile == "paper" else 0.05)
    beta = params.get("beta", 0.9)
    warm = params.get("warmup_epochs", 2)
    hist_n = params.get("history", 10)
    g_ref = params.get("reference_gain", 0.95)
    g_other = params.get("other_gain", 0.1)
    traces: dict[str, list[float]] = {m: [] for m in mods}
    acc = {m: 0.0 for m in mods}
    official_list = [0] * hist_n  # the released code starts its list with ten (int) zeros

    def window(t: int) -> dict[str, bool]:
        if profile == "none":
            return {m: False for m in mods}
        if profile == "official":
            if t == 0:
                k = 1
            else:
                tr1 = sum(official_list[-hist_n:]) / hist_n
                tr2 = sum(official_list[-hist_n - 1 : -1]) / hist_n
                k = (tr1 - tr2) / tr1 if tr1 != 0 else float("nan")
            return {m: k > K for m in mods}
        out = {}
        for m in mods:
            if t < max(2, warm):
                out[m] = False
                continue
            a, b = traces[m][t - 1], traces[m][t - 2]
            if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
                out[m] = False
            else:
                out[m] = (a - b) / a > K
        return out

    win = window(0)
    out = []
    for ev in events:
        if ev["type"] == "epoch_end":
            for m in mods:
                traces[m].append(acc[m])
                acc[m] = 0.0
            official_list.append(traces[ref][-1])
            win = window(ev["epoch"] + 1)
            continue
        for m in mods:
            acc[m] += ev["fisher"][m]
        f = {m: 0.0 for m in mods}
        s = ev["score_sum"]
        if profile == "official":
            other = [m for m in mods if m != ref][0]
            if s[ref] > s[other] and win[ref]:
                f[ref] = g_ref * math.exp(math.tanh(s[ref] - s[other]))
            elif s[ref] < s[other] and win[ref]:
                f[other] = g_other * math.exp(math.tanh(s[other] - s[ref]))
        elif profile == "paper":
            sc = {m: s[m] / ev["count"] for m in mods}
            for m in mods:
                lower = [sc[m] - sc[q] for q in mods if sc[q] < sc[m]]
                delta = sum(lower) / len(lower) if lower else 0.0
                if win[m] and delta > 0:
                    f[m] = math.exp(beta * math.tanh(delta))
        out.append({"epoch": ev["epoch"], "step": ev["step"], "factors": f})
    return out


def reference_ogm_ge(
    header: dict[str, Any],
    events: list[dict[str, Any]],
    alpha: float = 0.8,
    start_epoch: int = 0,
    end_epoch: int | None = None,
) -> list[dict[str, Any]]:
    """inforeg.md "Peer policy ogm-ge", read literally: per step ratio_m = s_m / mean(s_o, o != m)
    of the batch score sums; m slowed iff ratio_m > 1 with scale 1 - tanh(alpha * relu(ratio_m));
    every other scale 1; outside start_epoch <= e <= end_epoch every scale 1; proximal 0."""
    mods = header["modalities"]
    out = []
    for ev in events:
        if ev["type"] != "step":
            continue
        e, s = ev["epoch"], ev["score_sum"]
        scale = {m: 1.0 for m in mods}
        if start_epoch <= e and (end_epoch is None or e <= end_epoch):
            for m in mods:
                others = [s[o] for o in mods if o != m]
                mean = sum(others) / len(others)
                if mean == 0:
                    ratio = math.inf if s[m] > 0 else 0.0
                else:
                    ratio = s[m] / mean
                if ratio > 1:
                    relu = max(ratio, 0.0)
                    scale[m] = 1.0 - (math.tanh(alpha * relu) if alpha != 0 else 0.0)
        out.append({"epoch": e, "step": ev["step"], "factors": {m: 0.0 for m in mods}, "grad_scale": scale})
    return out
