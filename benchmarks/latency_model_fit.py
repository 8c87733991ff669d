"""How well the study's latency model predicts structures it never measured (ResNet-20).

    python benchmarks/latency_model_fit.py            # 8 probes + 48 random + ladder plans
    python benchmarks/latency_model_fit.py --random 16   # a quick look

The search fits its latency model on a few pre-checked uniform structures (the probes)
before the guided plans aim at a speed, then keeps refitting on every pre-check. This
benchmark measures, with the search's own pre-check (export + interleaved timing against
the fp32 file), the probes, random structures from the default space (random widths per
layer, random prune ratios per group, random activation mode) and uniform-pruned int8/float
structures, then fits the package's model on the probes only, and on the probes plus half
of the random structures, and reports its relative error on the rest. Writes
benchmarks/results/latency_model_fit.md and .json.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, machine_state, md_table, state_line, write_json, write_text

TEACHER = Path(__file__).resolve().parents[2] / "shared" / "models" / "resnet20-cifar10.pt"
MODEL_SPEC = "autocompress.zoo:resnet20"


def log(msg: str) -> None:
    print(msg, flush=True)


def random_plan(rng: random.Random, inventory: Any, config: Any) -> Any:
    from autocompress.model import space
    from autocompress.model.plan import CompressionPlan

    acts = rng.choice(list(config.activation_bits))
    base = space.uniform_plan(inventory, config, bits=32, activation_bits=acts)
    high = space.prune_high(config)
    steps = round(high / config.prune_step)
    grid = [round(i * config.prune_step, 6) for i in range(steps + 1)]
    # a random "style": mostly one width with a few others, pruning anywhere from none to heavy
    main = rng.choice(list(config.bits))
    spread = rng.random()
    bits = {k: (rng.choice(list(config.bits)) if rng.random() < spread else main)
            for k in base.bits}
    level = rng.random()
    prune = {k: rng.choice([r for r in grid if r <= high * level + 1e-9] or [0.0])
             for k in base.prune}
    return CompressionPlan(bits=bits, prune=prune, activation_bits=acts,
                           kd_temperature=base.kd_temperature, kd_alpha=base.kd_alpha,
                           finetune_steps=base.finetune_steps, learning_rate=base.learning_rate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stem", default="latency_model_fit")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(__file__).parent))
    from cifar10 import data as cdata

    from autocompress import study as study_mod
    from autocompress.config.options import SearchConfig
    from autocompress.model import space
    from autocompress.runtime.latency_model import LatencyModel, structure_features
    from autocompress.search import planning
    from autocompress.search import session as sessions
    from autocompress.transform.student import build_student

    state = machine_state(ort_threads=1, torch_threads=2)
    log(f"latency model benchmark: {state_line(state)}")
    cdata.ensure_cifar()
    spec = f"imagefolder:{cdata.root()}"
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'fit.db'}"
        config = SearchConfig(model=MODEL_SPEC, weights=str(TEACHER), data=spec,
                              study="latency-fit", storage=url, device="cpu",
                              artifacts=str(Path(tmp) / "artifacts"))
        storage = study_mod.open_storage(url)
        with sessions.torch_threads(2):
            session = sessions.open_session(config, url, storage, Path(tmp), log)
            runner, inventory, task = session.runner, session.inventory, session.task
            probes = [("probe", plan) for plan in planning.latency_probes(inventory, config)]
            uniform = [("uniform", space.uniform_plan(inventory, config, bits=b, ratio=r,
                                                      activation_bits=8 if b < 32 else 32))
                       for b in (8, 32) for r in (0.1, 0.2, 0.3, 0.4)]
            randoms = [("random", random_plan(rng, inventory, config)) for _ in range(args.random)]
            for kind, plan in probes + uniform + randoms:
                student = build_student(task, plan, config.round_to)
                pre = runner.precheck(student, plan, None, Path(tmp) / "pre", careful=True)
                feats = structure_features(student, plan, inventory, task.model)
                rows.append({"kind": kind, "plan": plan.summary(), "ratio": pre.ratio,
                             "features": feats})
                log(f"{kind:8s} {pre.ratio:.3f} {plan.summary()}")
    wall = time.perf_counter() - started

    def evaluate(train: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, Any]:
        model = LatencyModel()
        for i, r in enumerate(train):
            model.observe(str(i), r["features"], r["ratio"])
        errs = []
        signed = []
        for r in test:
            p = model.predict(r["features"])
            if p is None:
                continue
            errs.append(abs(p - r["ratio"]) / r["ratio"])
            signed.append((p - r["ratio"]) / r["ratio"])
        return {"n_train": len(train), "n_test": len(errs),
                "median_abs_rel_error": float(np.median(errs)) if errs else None,
                "p90_abs_rel_error": float(np.percentile(errs, 90)) if errs else None,
                "median_signed_rel_error": float(np.median(signed)) if signed else None}

    probe_rows = [r for r in rows if r["kind"] == "probe"]
    rand_rows = [r for r in rows if r["kind"] == "random"]
    uni_rows = [r for r in rows if r["kind"] == "uniform"]
    half = len(rand_rows) // 2
    fits = {
        "probes -> uniform pruned": evaluate(probe_rows, uni_rows),
        "probes -> random": evaluate(probe_rows, rand_rows),
        "probes + half random -> other half": evaluate(probe_rows + rand_rows[:half],
                                                       rand_rows[half:]),
    }
    data = {"command": "python benchmarks/latency_model_fit.py " + " ".join(sys.argv[1:]),
            "machine": state_line(state), "wall_s": wall, "rows": rows, "fits": fits}
    write_json(RESULTS / f"{args.stem}.json", data)
    table = md_table(["fit -> predicted", "train", "test", "median |err|", "p90 |err|",
                      "median signed err"],
                     [[k, v["n_train"], v["n_test"], f"{v['median_abs_rel_error']:.3f}",
                       f"{v['p90_abs_rel_error']:.3f}", f"{v['median_signed_rel_error']:+.3f}"]
                      for k, v in fits.items()])
    text = (f"# Latency model fit (ResNet-20, batch 1)\n\nCommand: `{data['command']}`\n\n"
            f"Machine: {data['machine']}\n\n{table}\n\nSigned error > 0: the model predicts "
            f"slower than measured. {len(rows)} structures measured in {wall:.0f} s.\n")
    write_text(RESULTS / f"{args.stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
