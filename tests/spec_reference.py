"""An independent, deliberately plain implementation of ../shared/spec/inforeg.md, written from
the spec text alone, used as the oracle for random traces. It shares no code with the service."""

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
