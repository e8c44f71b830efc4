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
        "plan", help="size a deployment: hardware x parallel layout, batch, tokens/s, cost",
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
    p.add_argument("--quant", choices=["w8a16", "w4a16", "w8a8", "fp8"], default=None)
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
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="plan the parallel layouts of N devices per hardware: TP x DP = N (and "
                   "EP over the MoE layers), the recommended one, and the devices needed just "
                   "to hold the model")
    p.add_argument("--ep", choices=["auto", "on", "off"], default="auto",
                   help="with --devices, for a MoE model: expert parallel over all N devices "
                   "(on), experts split with TP in each replica (off), or both (auto)")
    p.add_argument("--batch", type=int, default=1,
                   help="with --devices: requests whose KV cache the 'devices to hold' table "
                   "counts")
    p.add_argument("--context-parallel", action="store_true",
                   help="size context parallel (TP x CP) for one request of --input-len tokens; "
                   "shown anyway when one request fits no layout of a hardware")
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
    if args.devices is not None and not args.hardware:
        args.measure = False  # layouts are for catalog hardware unless 'this' is named
    hardware = _hardware(args)
    doc: dict = {"model": model.__dict__,
                 "request": {k: v for k, v in vars(req).items() if k != "model"}}
    if args.devices is not None:
        text, unfit = _run_layouts(args, req, hardware, doc)
    else:
        rows = plan(req, hardware)
        quad = quadrant(req, rows)
        text = render_plan(req, rows, quad)
        unfit = {r.hardware for r in rows} - {r.hardware for r in rows if r.fits}
        doc["rows"] = [r.to_dict() for r in rows]
        doc["quadrant"] = {"size": quad.size, "latency": quad.latency, "advice": quad.advice}
    if args.context_parallel or unfit:
        text += "\n" + _run_context_parallel(args, model, hardware, doc)
    print(text)
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "plan.md").write_text(text)
        (args.output_dir / "plan.json").write_text(json.dumps(_finite(doc), indent=1))
        if "rows" in doc:
            plot_plan(req, rows, args.output_dir / "plan.png")
    return 0


def _run_layouts(args: argparse.Namespace, req, hardware: list, doc: dict) -> tuple[str, set]:
    from soarllm.plan.layouts import devices_to_hold, plan_layouts
    from soarllm.plan.report import render_layouts

    lp = plan_layouts(req, hardware, args.devices, args.ep,
                      raise_if_none=not args.context_parallel)
    hold = [h for hw in hardware for h in devices_to_hold(
        req.model, hw, args.batch, req.input_len, req.output_len, req.kv_dtype)]
    doc["layouts"] = [r.to_dict() for r in lp.rows]
    doc["recommended"] = {k: r.layout for k, r in lp.recommended.items()}
    doc["notes"] = lp.notes
    doc["hold"] = [vars(h) for h in hold]
    unfit = {r.hardware for r in lp.rows} - {r.hardware for r in lp.rows if r.fits}
    return render_layouts(req, lp, hold, args.batch), unfit


def _run_context_parallel(args: argparse.Namespace, model, hardware: list, doc: dict) -> str:
    from soarllm.plan.long_context import fewest_devices, plan_context_parallel
    from soarllm.plan.report import render_context_parallel
    from soarllm.plan.roofline import Precision

    rows, fewest = [], {}
    for hw in hardware:
        precision = Precision.make(args.dtype or hw.default_dtype, args.quant, args.kv_dtype)
        hw_rows = plan_context_parallel(model, hw, precision, args.input_len, args.output_len)
        rows += hw_rows
        best = fewest_devices(hw_rows)
        if best:
            fewest[hw.id] = best
    doc["context_parallel"] = [r.to_dict() for r in rows]
    return render_context_parallel(model, args.input_len, args.output_len, rows, fewest)


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
