"""Candidate deployments of a model on a cluster, each with an analytic throughput estimate.

Devices are grouped into pools (same node, type and memory); a pool yields serving units, each one
instance's devices: single devices where the weights fit, else the smallest TP group that fits. Per unit the
estimate (:mod:`hetserve.planner.estimate`) uses the cost model for the workload's mean prompt ``P`` and
output ``O``: prefill seconds of one prompt, and the largest decode batch ``B`` whose step stays within 80% of
the TPOT SLO (and whose KV fits), giving ``O * step(B) / B`` decode seconds per request. Estimates rank
candidates and seed the rate search; the simulator decides.

Strategies enumerated: DP (all units; without the slowest types; TP pairs on the fastest type), PP (pools
too small for the weights as 2-device pipelines beside DP replicas; one pipeline over a small cluster), PD
(every P:D count per pool, then per-role TP by local search: the joint optimiser), Cronus (mains above a
speed threshold, heads below; adaptive and fixed split), Hetis (mains of the fastest type, attention workers
from the rest).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from hetserve.bench.metrics import Slo
from hetserve.core.cluster import ClusterConfig
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.estimate import Estimator, Unit

_MAX_PD_COMBOS = 20000


@dataclass(frozen=True)
class Candidate:
    name: str
    strategy: str
    config: dict[str, Any] = field(hash=False, compare=False)  # a deployment config without cluster/model
    device_ids: tuple[str, ...] = ()
    price_per_hour: float = 0.0
    estimate_rps: float = 0.0


# ---- pools and units ------------------------------------------------------------------------------


def _pools(cluster: ClusterConfig) -> list[list[Any]]:
    groups: dict[tuple[str, str, int], list[Any]] = {}
    for d in cluster.devices:
        groups.setdefault((d.node, d.spec.name, d.memory_bytes), []).append(d)
    return list(groups.values())


def _units_of(pool: list[Any], tp: int) -> list[Unit]:
    return [
        Unit(tuple(d.id for d in pool[i : i + tp]), pool[0].spec, pool[0].node, pool[0].memory_bytes)
        for i in range(0, len(pool) - tp + 1, tp)
    ]


def _inst(name: str, unit: Unit, role: str = "mixed", **extra: Any) -> dict[str, Any]:
    return {"name": name, "role": role, "devices": list(unit.ids), **extra}


def _label(units: list[Unit]) -> str:
    counts: dict[str, int] = {}
    for u in units:
        counts[u.label] = counts.get(u.label, 0) + 1
    return "+".join(f"{n}x{k}" for k, n in counts.items())


def enumerate_candidates(
    cluster: ClusterConfig,
    model: ModelConfig,
    stats: dict[str, float],
    slo: Slo,
    *,
    strategies: tuple[str, ...] | None = None,
    max_model_len: int = 8192,
    dtype: str = "bfloat16",
    profiles: dict[str, Any] | None = None,
) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """(candidates, pruned with reasons). ``profiles``: measured DeviceProfiles by device type name."""
    est = Estimator(cluster, model, stats, slo, max_model_len, dtype)
    est.profiles = dict(profiles or {})
    want = set(strategies or ("dp", "pp", "pd", "cronus", "hetis"))
    pruned: list[tuple[Candidate, str]] = []
    base = {"max_model_len": max_model_len, "dtype": dtype}
    price = {d.id: d.spec.price_per_hour for d in cluster.devices}

    def cand(name: str, strategy: str, cfg: dict[str, Any], estimate: float) -> Candidate:
        ids = [x for i in cfg["instances"] for x in i["devices"]]
        ids += [w["device"] for i in cfg["instances"] for w in i.get("workers", [])]
        return Candidate(
            name, strategy, {"strategy": strategy, **base, **cfg}, tuple(ids), sum(price[x] for x in ids), estimate
        )

    # serving units per pool: tp 1 where the weights fit, else the smallest TP group that does
    units: list[Unit] = []  # fitting units, best tp per pool
    small: list[list[Any]] = []  # pools whose devices cannot hold the weights alone
    tp_up: dict[int, list[Unit]] = {}  # pool index -> units at twice the tp
    for pi, pool in enumerate(_pools(cluster)):
        found = False
        for tp in (1, 2, 4, 8):
            if tp > len(pool):
                break
            us = _units_of(pool, tp)
            ok = est.fits(us[0])[0]
            if tp == 1 and not ok:
                small.append(pool)
                for d in pool:
                    why_d = est.fits(Unit((d.id,), d.spec, d.node, d.memory_bytes))[1]
                    pruned.append((Candidate(f"dp replica on {d.spec.name} ({d.id})", "dp", {}, (d.id,)), why_d))
            if ok:
                units.extend(us)
                found = True
                if 2 * tp <= len(pool) and est.fits(_units_of(pool, 2 * tp)[0])[0]:
                    tp_up[pi] = _units_of(pool, 2 * tp)
                break
        if not found and len(pool) > 1:
            why = "weights do not fit even at the largest TP degree the pool allows"
            pruned.append(
                (
                    Candidate(
                        f"TP group of {pool[0].spec.name} on {pool[0].node}", "dp", {}, tuple(d.id for d in pool)
                    ),
                    why,
                )
            )
    small_ids = {d.id for p in small for d in p}
    big_units = [u for u in units if not set(u.ids) & small_ids]  # units that are not TP groups of small devices
    rank = {u: est.figures(u).mixed_rps / u.tp for u in units}
    types = sorted({u.spec.name for u in units}, key=lambda n: -max(rank[u] for u in units if u.spec.name == n))
    by_type = {t: [u for u in units if u.spec.name == t] for t in types}
    out: list[Candidate] = []

    def dp_cand(us: list[Unit], tag: str) -> None:
        insts = [_inst(f"r{i}", u) for i, u in enumerate(us)]
        out.append(cand(f"dp {tag}", "dp", {"instances": insts}, sum(est.figures(u).mixed_rps for u in us)))

    if "dp" in want and units:
        dp_cand(units, _label(units))
        for j in range(1, len(types)):
            keep = [u for t in types[:j] for u in by_type[t]]
            dp_cand(keep, _label(keep) + f" (without {', '.join(types[j:])})")
        for pi, ups in tp_up.items():
            if ups[0].spec.name == types[0]:
                rest = [u for u in units if not set(u.ids) & {x for v in ups for x in v.ids}]
                dp_cand(ups + rest, _label(ups + rest))
    if "pp" in want:
        out.extend(_pp_candidates(est, cluster, big_units, small, cand))
    if "pd" in want and len(units) >= 2:
        out.extend(_pd_candidates(est, cluster, units, tp_up, cand, pruned))
    if "cronus" in want and len(types) >= 2:
        for j in range(1, len(types)):
            mains = [u for t in types[:j] for u in by_type[t]]
            heads = [u for t in types[j:] for u in by_type[t]]
            insts = [_inst(f"m{i}", u, "main") for i, u in enumerate(mains)]
            insts += [_inst(f"h{i}", u, "head") for i, u in enumerate(heads)]
            tbt = slo.tpot_ms or 100.0
            rps = _cronus_rps(est, mains, heads)
            name = f"cronus main[{_label(mains)}] head[{_label(heads)}]"
            out.append(
                cand(
                    name + " adaptive",
                    "cronus",
                    {"instances": insts, "tbt_slo_ms": tbt, "split_policy": {"kind": "adaptive", "tbt_slo_ms": tbt}},
                    rps,
                )
            )
            if j == 1:
                k = max(16, est.P // 2 // 16 * 16)
                out.append(
                    cand(
                        name + f" fixed k={k}",
                        "cronus",
                        {"instances": insts, "tbt_slo_ms": tbt, "split_policy": {"kind": "fixed", "k": k}},
                        rps * 0.95,
                    )
                )
    if "hetis" in want and units:
        out.extend(_hetis_candidates(est, cluster, model, big_units, small, types, by_type, cand, pruned))
    return out, pruned


def _pp_candidates(
    est: Estimator, cluster: ClusterConfig, units: list[Unit], small: list[list[Any]], cand: Any
) -> list[Candidate]:
    from hetserve.strategies.build import build_deployment

    out: list[Candidate] = []
    configs: list[tuple[str, list[dict[str, Any]]]] = []
    pipes: list[dict[str, Any]] = []
    for pool in small:
        for i in range(0, len(pool) - 1, 2):
            pipes.append({"name": f"pp{len(pipes)}", "devices": [pool[i].id, pool[i + 1].id], "layers": "auto"})
    if pipes:
        insts = [_inst(f"r{i}", u) for i, u in enumerate(units)] + pipes
        configs.append((f"pp {_label(units)}+{len(pipes)} pipelines of small devices", insts))
    devs = sorted(cluster.devices, key=lambda d: -d.spec.hbm_bytes_per_s)
    if 2 <= len(devs) <= 4:
        configs.append(
            (
                f"pp one pipeline over {'+'.join(d.spec.name for d in devs)}",
                [{"name": "pp0", "devices": [d.id for d in devs], "layers": "auto"}],
            )
        )
    for name, insts in configs:
        cfg = {"strategy": "pp", "max_model_len": est.max_model_len, "dtype": est.dtype, "instances": insts}
        try:
            dep = build_deployment(cluster, est.model, cfg, est.profiles)
        except ValidationError:
            continue  # the memory reasons are reported with the DP units
        insts = [dict(i, layers=dep.plans[i["name"]].notes["layers"]) if "layers" in i else i for i in insts]
        out.append(cand(name, "pp", {"instances": insts}, est.plan_rps(list(dep.plans.values()), {})))
    return out


def _pd_rps(est: Estimator, cluster: ClusterConfig, P: list[Unit], D: list[Unit]) -> tuple[float, str]:
    from hetserve.strategies.build_instance import slowest_link

    kv_bytes = 2 * est.model.num_hidden_layers * est.model.num_key_value_heads * est.model.head_dim * 2 * est.P
    prefill = 0.0
    link_rps = 0.0
    worst = ""
    for u in P:
        lk = slowest_link(cluster, list(u.ids), [x for d in D for x in d.ids])
        xfer = lk.latency_s + kv_bytes / lk.bandwidth_bytes_per_s
        f = est.figures(u)
        if f.prefill_s + xfer > est.ttft_s:
            worst = (
                f"KV transfer over {lk.name} takes {xfer:.2f} s per mean prompt; with prefill "
                f"({f.prefill_s:.2f} s) it exceeds the TTFT SLO"
            )
            continue
        prefill += 1 / f.prefill_s
        link_rps += 1 / xfer
    decode = sum(est.figures(u).decode_rps for u in D)
    return min(prefill, decode, link_rps), worst


def _pd_candidates(
    est: Estimator,
    cluster: ClusterConfig,
    units: list[Unit],
    tp_up: dict[int, list[Unit]],
    cand: Any,
    pruned: list[tuple[Candidate, str]],
) -> list[Candidate]:
    groups: dict[tuple[str, str], list[Unit]] = {}
    for u in units:
        groups.setdefault((u.node, u.spec.name), []).append(u)
    pools = list(groups.values())
    choices = [range(len(p) + 1) for p in pools]
    combos = itertools.product(*choices)
    scored: list[tuple[float, list[Unit], list[Unit]]] = []
    reasons: dict[str, str] = {}
    for n, combo in enumerate(combos):
        if n >= _MAX_PD_COMBOS:
            break
        P = [u for p, k in zip(pools, combo) for u in p[:k]]
        D = [u for p, k in zip(pools, combo) for u in p[k:]]
        if not P or not D:
            continue
        rps, why = _pd_rps(est, cluster, P, D)
        if rps <= 0:
            reasons[f"pd P[{_label(P)}] D[{_label(D)}]"] = why or "no prefill or decode capacity within the SLO"
            continue
        scored.append((rps, P, D))
    scored.sort(key=lambda x: -x[0])
    out: list[Candidate] = []
    for rps, P, D in scored[:6]:
        # per-role TP: double a role's TP degree on a pool while the estimate improves
        improved = True
        while improved:
            improved = False
            for role in ("P", "D"):
                cur = P if role == "P" else D
                for ups in tp_up.values():
                    ids = {x for v in ups for x in v.ids}
                    mine = [u for u in cur if set(u.ids) <= ids]
                    if not mine or len(mine) < 2 or any(u.tp != ups[0].tp // 2 for u in mine):
                        continue
                    mine_ids = {x for u in mine for x in u.ids}
                    new = [u for u in cur if u not in mine] + [v for v in ups if set(v.ids) <= mine_ids]
                    P2, D2 = (new, D) if role == "P" else (P, new)
                    r2, _ = _pd_rps(est, cluster, P2, D2)
                    if r2 > rps * 1.02:
                        P, D, rps, improved = P2, D2, r2, True
                        break
        insts = [_inst(f"p{i}", u, "prefill") for i, u in enumerate(P)]
        insts += [_inst(f"d{i}", u, "decode") for i, u in enumerate(D)]
        c = cand(f"pd P[{_label(P)}] D[{_label(D)}]", "pd", {"instances": insts}, rps)
        if all(c.name != o.name for o in out):
            out.append(c)
    for name, why in list(reasons.items())[:8]:
        pruned.append((Candidate(name, "pd", {}), why))
    return out


def _cronus_rps(est: Estimator, mains: list[Unit], heads: list[Unit]) -> float:
    """Heads take a fraction ``phi`` of every prompt; ``phi`` balances head and main busy time."""
    M = len(mains)
    H = len(heads)
    pf_m = sum(est.figures(u).prefill_s for u in mains) / M
    d_m = sum(est.figures(u).decode_s for u in mains) / M
    pf_h = sum(est.figures(u).prefill_s for u in heads) / H
    phi = min(1.0, H * (pf_m + d_m) / (M * pf_h + H * pf_m))
    return min(M / ((1 - phi) * pf_m + d_m), H / (phi * pf_h) if phi > 0 else float("inf"))


def _hetis_candidates(
    est: Estimator,
    cluster: ClusterConfig,
    model: ModelConfig,
    units: list[Unit],
    small: list[list[Any]],
    types: list[str],
    by_type: dict[str, list[Unit]],
    cand: Any,
    pruned: list[tuple[Candidate, str]],
) -> list[Candidate]:
    from hetserve.strategies.build import build_deployment

    out: list[Candidate] = []
    mains = [u for u in by_type[types[0]] if u.tp == 1 and u in units]
    if not mains:
        return out
    others = [u for u in units if u not in mains]
    small_ids = [d.id for p in small for d in p]
    variants = []
    if small_ids:
        variants.append(("small devices as workers", small_ids, others))
    if others:
        variants.append(("every other device as a worker", small_ids + [x for u in others for x in u.ids], []))
    for tag, worker_ids, replicas in variants:
        assign: dict[str, list[str]] = {u.ids[0]: [] for u in mains}
        for w in worker_ids:
            node = cluster.device(w).node
            local = [m for m in assign if cluster.device(m).node == node]
            pick = min(local or list(assign), key=lambda m: len(assign[m]))
            assign[pick].append(w)
        insts = [
            {"name": f"m{i}", "role": "main", "devices": [m], "workers": [{"device": w} for w in ws]}
            for i, (m, ws) in enumerate(assign.items())
        ]
        insts += [_inst(f"r{i}", u) for i, u in enumerate(replicas)]
        cfg = {
            "strategy": "hetis",
            "max_model_len": est.max_model_len,
            "dtype": est.dtype,
            "instances": insts,
            "mean_context_tokens": int(est.P + est.O / 2),
        }
        name = f"hetis main[{_label(mains)}] ({tag})"
        try:
            dep = build_deployment(cluster, model, cfg, est.profiles)
        except ValidationError as e:
            pruned.append((Candidate(name, "hetis", {}), f"{e.field}: {e.message}"))
            continue
        dispatchers = dep.dispatchers  # type: ignore[attr-defined]
        rps = est.plan_rps(list(dep.plans.values()), dispatchers)
        for inst in insts:  # write the dispatcher's initial heads into the config
            d = dispatchers.get(inst["name"])
            if d is not None:
                for w, heads in zip(inst["workers"], d.assignment):
                    w["kv_heads"] = heads
        out.append(cand(name, "hetis", {k: v for k, v in cfg.items() if k not in ("strategy",)}, rps))
    return out
