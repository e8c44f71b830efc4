"""``soar plan``: predict latency, capacity and cost on hardware you do not have yet."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from soarllm.cli.parser import add_model_argument

    p = subparsers.add_parser(
        "plan", help="size a deployment: hardware x tensor parallel, batch, tokens/s, cost",
        description="Roofline planner over a hardware catalog (each figure with its source) and "
        "this machine, measured on the spot. --calibrate fits its efficiency factors to soar "
        "bench results and reports prediction error.",
    )
    add_model_argument(p, help="known name (e.g. Llama-3-8B), config.json, model directory or "
                       ".gguf file")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--slo-ttft", type=float, default=1000.0, metavar="MS")
    p.add_argument("--slo-tpot", type=float, default=50.0, metavar="MS")
    p.add_argument("--quant", choices=["w8a16", "w4a16", "w8a8"], default=None)
    p.add_argument("--kv-dtype", choices=["bf16", "fp16", "fp8", "int8", "fp32"], default=None)
    p.add_argument("--dtype", default=None, help="compute dtype (default: the hardware's)")
    p.add_argument("--hardware", default=None,
                   help="comma list of catalog ids and/or 'this' (default: all and this machine)")
    p.add_argument("--catalog", default=None, help="a catalog JSON file instead of the shipped one")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="leave this machine out (no on-the-spot measurement)")
    p.add_argument("--price-this", type=float, default=None, help="USD/hour for this machine")
    p.add_argument("--efficiency", default=None,
                   help="calibration JSON (from --calibrate) whose factors apply to its hardware")
    p.add_argument("--calibrate", default=None, nargs="+", metavar="RESULTS.json",
                   help="fit efficiency factors to soar bench results (one or more files, e.g. "
                   "runs at several input lengths) and report the error, in-sample and on "
                   "batch sizes held out of the fit")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="write plan.md, plan.json and plan.png (or calibration.*) here")
    p.set_defaults(func=_run)


def _hardware(args: argparse.Namespace) -> list:
    from soarllm.plan.hardware import load_catalog, select
    from soarllm.plan.measure import this_machine

    ids = [x.strip() for x in args.hardware.split(",")] if args.hardware else None
    catalog = load_catalog(args.catalog)
    want_this = (ids is None and args.measure) or (ids is not None and "this" in ids)
    chosen = select(catalog, [i for i in ids if i != "this"] if ids else None)
    if ids is not None and ids == ["this"]:
        chosen = []
    if want_this:
        chosen = [*chosen, this_machine(price_per_hour=args.price_this)]
    if args.efficiency:
        from soarllm.plan.hardware import Efficiency, with_efficiency

        data = json.loads(Path(args.efficiency).read_text())
        eff = Efficiency(**data["efficiency"])
        chosen = [with_efficiency(h, eff) if h.id == data.get("hardware", "this") else h
                  for h in chosen]
    return chosen


def _run(args: argparse.Namespace) -> int:
    from soarllm.plan.model_shape import load_model_shape

    model = load_model_shape(args.model)
    if args.calibrate:
        return _run_calibrate(args, model)
    from soarllm.plan.planner import PlanRequest, plan, quadrant
    from soarllm.plan.report import plot_plan, render_plan

    req = PlanRequest(model, args.input_len, args.output_len, args.slo_ttft, args.slo_tpot,
                      args.quant, args.kv_dtype, args.dtype)
    rows = plan(req, _hardware(args))
    quad = quadrant(req, rows)
    text = render_plan(req, rows, quad)
    print(text)
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "plan.md").write_text(text)
        (args.output_dir / "plan.json").write_text(json.dumps({
            "model": model.__dict__, "request": {k: v for k, v in vars(req).items() if k != "model"},
            "rows": [r.to_dict() for r in rows],
            "quadrant": {"size": quad.size, "latency": quad.latency, "advice": quad.advice},
        }, indent=1))
        plot_plan(req, rows, args.output_dir / "plan.png")
    return 0


def _read_results(path: str) -> dict:
    from soarllm.errors import InvalidRequestError

    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise InvalidRequestError(f"cannot read --calibrate file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"--calibrate file {path} is not JSON ({e}): pass the "
                                  "--output-json of soar bench offline or soar bench serve") from None


def _finite(x):
    """JSON-safe: NaN and infinities become null, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _run_calibrate(args: argparse.Namespace, model) -> int:
    from soarllm.errors import InvalidRequestError
    from soarllm.plan.calibrate import calibrate, observations_from_results, render_calibration
    from soarllm.plan.roofline import Precision

    obs = [o for path in args.calibrate for o in observations_from_results(_read_results(path))]
    if not args.hardware:
        args.hardware = "this"
    hardware = _hardware(args)
    if len(hardware) != 1:
        raise InvalidRequestError("--calibrate fits one hardware: pass --hardware ID (or 'this')")
    hw = hardware[0]
    precision = Precision.make(args.dtype or hw.default_dtype, args.quant, args.kv_dtype)
    rep = calibrate(model, hw, precision, obs)
    text = render_calibration(rep, model, hw)
    print(text)
    for w in rep.warnings:
        print(f"soar plan: warning: {w}", file=sys.stderr)
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "calibration.md").write_text(text)
        (args.output_dir / "calibration.json").write_text(json.dumps(_finite({
            "hardware": hw.id, "model": model.name, "efficiency": rep.after.to_dict(),
            "efficiency_before": rep.before.to_dict(), "mape_percent": rep.mape,
            "held_out": rep.held_out.to_dict() if rep.held_out else None,
            "warnings": rep.warnings, "rows": rep.rows,
        }), indent=1))
    return 0
