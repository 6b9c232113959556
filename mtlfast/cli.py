"""The ``mtlfast`` command: ``train``, ``eval``, ``score``, ``baseline``, ``data``, ``bench``, ``info``."""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def _cmd_info(args: argparse.Namespace) -> int:
    from mtlfast.info import info_text

    print(info_text())
    if args.out and not args.models:
        raise ValueError("--out writes the --models table; give --models")
    if (args.blocks or args.cases) and not args.models:
        raise ValueError("--blocks and --cases go with --models")
    _check_out_folder(args.out)
    if args.models:
        from mtlfast.models.summary import SETTINGS, format_block_table, format_table, model_summary

        settings = [s for s in SETTINGS if not args.cases or re.search(args.cases, s.name)]
        if not settings:
            raise ValueError(f"--cases {args.cases!r} matches no model (names are method-backbone-dataset, e.g. "
                             f"{SETTINGS[0].name})")
        rows = model_summary(settings, flops=not args.no_flops, activations=args.activations, blocks=args.blocks)
        print()
        print(format_table(rows))
        for row in rows if args.blocks else ():
            print()
            print(format_block_table(row))
        if args.out:
            from mtlfast.bench.harness import environment, write_json

            env = environment("cpu")
            try:  # the paper backbones' provenance
                import timm
                env["timm"] = timm.__version__
            except ImportError:
                env["timm"] = None
            print(f"wrote {write_json(args.out, {'environment': env, 'rows': rows})}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from mtlfast.bench import harness

    if args.models:
        return _bench_models(args)
    if args.max_batch or args.compile:
        raise ValueError("--max-batch and --compile go with --models")
    benchmarks = harness.load_benchmarks()
    if args.report:
        return _bench_report(args.report, benchmarks)
    unknown = [op for op in args.ops if op not in benchmarks]
    if unknown:
        print(f"mtlfast bench: unknown op(s) {', '.join(unknown)}; available: "
              f"{', '.join(sorted(benchmarks)) or 'none'}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = getattr(torch, _DTYPES[dtype_name])
    if device == "cpu":
        print("mtlfast bench: no CUDA device, running the CPU providers only (the C++ CPU kernels, eager and "
              "torch.compile references); Triton kernels are not timed under the interpreter.")
    selected = args.ops or sorted(benchmarks)
    if not selected:
        print("mtlfast bench: no benchmarks registered yet")
        return 0
    args.out = _result_folder(args.out, args.quick)
    if args.resume and not args.out:
        raise ValueError("--resume continues the result files under --out; give --out")
    names = [case.name for op in selected for case in benchmarks[op].cases(device)]
    if args.cases and not any(re.search(args.cases, name) for name in names):
        print(f"mtlfast bench: --cases {args.cases!r} matches no case of {', '.join(selected)}", file=sys.stderr)
        return 2
    _refuse_stale_extension()
    deadline = None if args.budget is None else time.monotonic() + args.budget
    peaks = harness.measure_peaks(device)
    modes = tuple(m.strip() for m in args.modes.split(","))
    if not modes or any(m not in ("fwd", "fwd+bwd") for m in modes) or len(set(modes)) < len(modes):
        raise ValueError(f"--modes: expected a comma list of fwd, fwd+bwd (each once), got {args.modes!r}")
    incomplete = []
    for op in selected:
        if args.cases and not any(re.search(args.cases, c.name) for c in benchmarks[op].cases(device)):
            continue  # none of its cases selected: its result file stays as it was
        previous = None
        if args.resume:
            previous = harness.read_result(args.out, device, op, dtype)
            ok, why = harness.resumable(previous, op, dtype, modes, device, args.quick)
            if previous is not None and not ok:
                print(f"mtlfast bench: {op}: not resuming, {why}")
                previous = None
        # written after every case, so that a run stopped from outside keeps what it measured
        save = (lambda result: harness.write_result(result, args.out, device)) if args.out else None
        result = harness.run_benchmark(benchmarks[op], device=device, dtype=dtype, modes=modes, peaks=peaks,
                                       quick=args.quick, case_filter=args.cases, deadline=deadline,
                                       previous=previous, on_case=save)
        print(harness.format_table(result))
        checks = harness.check_targets(result, benchmarks[op].targets)
        if checks:
            print(harness.format_targets(checks))
        if args.out:
            if harness.measured_now(result) or harness.read_result(args.out, device, op, dtype) is None:
                print(f"wrote {harness.write_result(result, args.out, device)}")
            else:  # e.g. a time budget spent before this op: an earlier file is not replaced by empty rows
                print(f"mtlfast bench: {op}: no case measured; {harness.result_path(args.out, device, op, dtype)} "
                      "left as it was")
        if any(r.get("skipped") == harness.NOT_RUN for r in result["rows"]):
            incomplete.append(op)
    if incomplete:
        print(f"mtlfast bench: time budget spent; cases left in {', '.join(incomplete)} "
              "(run again with --resume to measure only those)")
        return 3
    return 0


def _refuse_stale_extension() -> None:
    """Results record the tree's source fingerprint: an extension built from other sources would credit the tree
    with another build's numbers."""
    from mtlfast import _ext

    why = _ext.stale_reason()
    if why:
        raise RuntimeError(f"bench: {why}")


def _bench_report(folder: str, benchmarks: dict) -> int:
    """The targets of every op result file (``<op>.json``) in a results folder, as one Markdown table."""
    import glob

    from mtlfast._files import read_json
    from mtlfast.bench import harness

    paths = sorted(p for p in glob.glob(os.path.join(folder, "*.json"))
                   if os.path.basename(p)[:-5].split(".")[0] in benchmarks)  # <op>.json, <op>.<dtype>.json
    models_path = os.path.join(folder, "models.json")
    if not paths and not os.path.exists(models_path):
        raise FileNotFoundError(f"--report: no op result files (<op>.json for {', '.join(sorted(benchmarks))}) "
                                f"and no models.json in {folder!r}")
    checks = []
    for path in paths:
        result = read_json(path)
        checks += harness.check_targets(result, benchmarks[result["op"]].targets)
        for run in result.get("runs") or [{"environment": result["environment"]}]:
            env = run["environment"]
            print(f"{os.path.basename(path)}: {result.get('dtype')}, {env['device']}, torch {env['torch']}, "
                  f"triton {env.get('triton')}, commit {env['commit']}, {env['date']}")
        if result.get("quick"):
            print(f"{os.path.basename(path)}: a --quick smoke run, not for reporting")
        default = harness.DEFAULT_DTYPES[harness.result_device(result)]
        if result.get("dtype", default) != default:
            print(f"{os.path.basename(path)}: a {result['dtype']} run; the targets are judged on {default} results")
        if result.get("complete") is False:
            print(f"{os.path.basename(path)}: incomplete, cases not measured yet: "
                  f"{', '.join(result.get('cases_left') or ['(by a time budget)'])}")
    if paths:
        print(harness.format_targets(checks))
    if os.path.exists(models_path):
        from mtlfast.bench import models

        result = read_json(models_path)
        env = result["environment"]
        left = result.get("settings_left") or []
        print(f"models.json: {env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}"
              + (f"; not run yet: {', '.join(left)}" if left else "")
              + ("; a quick check, not for reporting" if result.get("quick") else ""))
        print(models.format_models_markdown(result["results"]))
    return 0


def _bench_models(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from mtlfast._files import read_json
    from mtlfast.bench import harness, models
    from mtlfast.models.backbones import needs_timm, timm_unusable

    _refuse_stale_extension()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = [s for s in models.SETTINGS if not args.cases or re.search(args.cases, s.name)]
    if not settings:
        raise ValueError(f"--cases {args.cases!r} matches no model setting (names are method-backbone-dataset, e.g. "
                         f"{models.SETTINGS[0].name})")
    why = timm_unusable() if any(needs_timm(s.backbone) for s in settings) else None
    if why:  # refused before anything runs or is written
        raise ImportError(why)
    quick = args.quick or device.type == "cpu"  # a CPU model run is a check at small shapes
    args.out = _result_folder(args.out, quick)
    if device.type == "cpu":
        print("mtlfast bench --models: no CUDA device; running small shapes (128x128, batch 1) as a check only, "
              "no claim about speed")
        settings = [dataclasses.replace(s, size=(128, 128), batch=1) for s in settings]
    deadline = None if args.budget is None else time.monotonic() + args.budget
    folder = os.path.join(args.out, harness.device_slug(device.type)) if args.out else None
    environment = harness.environment(device.type)
    # Results of an earlier run of the same sources, extension build and versions (harness.RESUME_ENVIRONMENT;
    # another call, or other --cases) are kept, setting by setting, each with the environment it was measured in.
    earlier = []
    if folder and os.path.exists(os.path.join(folder, "models.json")):
        previous = read_json(os.path.join(folder, "models.json"))
        before = previous.get("environment", {})
        differ = [key for key in harness.RESUME_ENVIRONMENT if before.get(key) != environment[key]]
        if not differ and previous.get("quick") == quick:
            earlier = [{"environment": before, **r} for r in previous.get("results", [])]
        elif previous.get("results"):
            print(f"mtlfast bench --models: the earlier results in {folder} are not kept ("
                  + (f"another {', '.join(differ)}" if differ else "a quick check") + ")")

    def save(results, left):  # after every setting, so that a run stopped from outside keeps what it measured
        if not folder:
            return
        merged = models.merge_results(earlier, results)
        harness.write_json(os.path.join(folder, "models.json"),
                           {"environment": environment, "quick": quick, "complete": not left, "settings_left": left,
                            "results": merged})
        try:  # the plot is a convenience: its failure (e.g. no matplotlib) must not lose a finished run
            models.plot_models(merged, os.path.join(folder, "models.png"))
        except Exception as exc:
            print(f"mtlfast bench --models: no plot ({exc.__class__.__name__}: {exc})", file=sys.stderr)

    results, left = [], [s.name for s in settings]
    for setting in settings:
        if deadline is not None and time.monotonic() > deadline:
            break
        print(f"-- {setting.name} {setting.size} batch {setting.batch}", flush=True)
        try:
            result = models.run_setting(setting, device, quick=quick, find_max_batch=args.max_batch,
                                        deadline=deadline, compiled=args.compile)
        except RuntimeError as exc:  # the CUDA context is lost (harness): nothing more can run in this process
            save(results, left)
            print(f"mtlfast bench --models: {exc}", file=sys.stderr)
            return 1
        results.append({"environment": environment, **result})
        left.remove(setting.name)
        print(models.format_models_table([result]), models.format_block_breakdown(result), sep="\n", flush=True)
        save(results, left)
    if not results:  # otherwise the last setting's save wrote this state already
        save(results, left)
    if folder:
        print(f"wrote {folder}/models.json and models.png")
    failed = models.failures(results)
    if failed:
        print("mtlfast bench --models: failed (not out of memory):\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    if left:
        print(f"mtlfast bench --models: time budget spent; not run: {', '.join(left)}")
        return 3
    return 0


def _result_folder(out: str | None, quick: bool) -> str:
    """``bench --out``: as given, else bench/results, but nothing ("") for a quick check, whose numbers must not
    replace measured ones."""
    if out is not None:
        return out
    if quick:
        print("mtlfast bench: a quick check writes no result file unless --out is given")
        return ""
    return os.path.join("bench", "results")


def _check_folder(folder: str, option: str) -> None:
    """Creates an output folder of ``option`` before the work, so that an unwritable place fails at once, not
    after an evaluation or training whose results it would lose."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{option}: cannot create the folder {folder!r}: {exc}") from exc
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{option}: cannot write into {folder!r}")


def _check_out_folder(out: str | None, option: str = "--out", keep: str | None = None) -> None:
    """The output file ``out`` of ``option``: not a folder, not a checkpoint (the file ``keep``, or any existing
    ``.pt`` file: a command never overwrites one), and its folder created (:func:`_check_folder`)."""
    if out:
        if os.path.isdir(out):
            raise IsADirectoryError(f"{option}: {out!r} is a folder; expected a file name")
        if os.path.exists(out) and (out.endswith(".pt") or (keep and os.path.samefile(out, keep))):
            raise FileExistsError(f"{option}: {out!r} is a checkpoint, which would be overwritten; name another file")
        _check_folder(os.path.dirname(os.path.abspath(out)), option)


def _print_metrics(title: str, metrics: dict) -> None:
    print(title)
    for key, value in metrics.items():
        print(f"  {key:<24} {value:.4f}")


def _cmd_train(args: argparse.Namespace) -> int:
    from mtlfast.engine.config import load_config
    from mtlfast.engine.trainer import Trainer

    config = load_config(args.config, args.overrides)
    resume = args.resume
    if resume == "auto":
        last = os.path.join(config["output_dir"], "last.pt")
        resume = last if os.path.exists(last) else None
    trainer = Trainer(config, resume=resume, progress=not args.no_progress)
    try:
        trainer.evaluate_if_due()  # every rank: rank 0 evaluates, the others wait in its barrier
        trainer.train()
        if trainer.dist.is_main:
            rows = trainer.log.read("eval")
            if rows:
                _print_metrics(f"first evaluation (iteration {int(rows[0]['iteration'])}):",
                               {k: v for k, v in rows[0].items() if k != "iteration"})
                _print_metrics(f"final evaluation (iteration {int(rows[-1]['iteration'])}):",
                               {k: v for k, v in rows[-1].items() if k != "iteration"})
            print(f"checkpoint, logs and plots in {config['output_dir']}")
    finally:
        trainer.close()
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mtlfast._files import write_json_atomically
    from mtlfast.engine import checkpoint as ckpt
    from mtlfast.engine.distributed import barrier
    from mtlfast.engine.trainer import Trainer

    payload = ckpt.load_checkpoint(args.checkpoint, training=False)
    config = ckpt.checkpoint_config(payload, args.checkpoint, args.overrides)
    iteration = payload.get("iteration")  # None: a checkpoint stripped to config and weights
    _check_out_folder(args.out, keep=args.checkpoint)
    _check_out_folder(args.samples, "--samples", keep=args.checkpoint)
    if args.save_predictions:
        _check_folder(args.save_predictions, "--save-predictions")
    # the run's logs stay as they are; the training split is not needed (nor read)
    trainer = Trainer(config, resume=args.checkpoint, progress=not args.no_progress, logs=False, train_data=False,
                      checkpoint=payload)
    del payload  # the trainer holds what it needs
    try:  # under torchrun rank 0 evaluates all images (or every rank its share: eval.sharded=true) and reports
        if trainer.dist.is_main or trainer.sharded_evaluation:
            metrics = trainer.evaluate(args.samples if trainer.dist.is_main else None, args.save_predictions,
                                       shard=trainer.sharded_evaluation)
        barrier(trainer.dist)
    finally:
        trainer.close()
    if not trainer.dist.is_main:
        return 0
    _print_metrics(f"evaluation of {args.checkpoint} (iteration {'not recorded' if iteration is None else iteration}):",
                   metrics)
    if args.out:
        write_json_atomically(args.out, {"checkpoint": args.checkpoint, "iteration": iteration,
                                         "metrics": metrics, "per_class_iou": trainer.per_class_iou})
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from mtlfast._files import write_json_atomically
    from mtlfast.data import canonical_dataset, check_tasks
    from mtlfast.engine import checkpoint as ckpt
    from mtlfast.engine.config import load_config
    from mtlfast.engine.predictions import score_predictions
    from mtlfast.engine.trainer import build_split, resolve_workers, run_baseline

    if args.config and args.checkpoint:
        raise ValueError("score: pass --config or --checkpoint (whose config names the data), not both")
    if args.checkpoint:
        config = ckpt.checkpoint_config(ckpt.load_checkpoint(args.checkpoint, training=False), args.checkpoint,
                                        args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    if not os.path.isdir(args.predictions):
        raise FileNotFoundError(f"--predictions: folder not found: {args.predictions}")
    _check_out_folder(args.out, keep=args.checkpoint)
    dataset = canonical_dataset(config["data"]["dataset"])
    tasks = list(check_tasks(config["data"]["tasks"], dataset))
    baseline = run_baseline(config["eval"]["baseline"], dataset, tasks)
    scores = score_predictions(args.predictions, build_split(config, "val", tasks), tasks,
                               edge_thresholds=config["eval"]["edge_thresholds"], baseline=baseline,
                               edge_workers=resolve_workers(config["eval"]["edge_workers"], dataset,
                                                            "eval.edge_workers"), progress=not args.no_progress)
    _print_metrics(f"scores of the predictions in {args.predictions}:", scores.metrics)
    if args.out:
        write_json_atomically(args.out, {"predictions": args.predictions, "metrics": scores.metrics,
                                         "per_class_iou": scores.per_class_iou})
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from mtlfast._files import write_json_atomically
    from mtlfast.data import canonical_dataset, check_tasks
    from mtlfast.data.check import check_split, format_report
    from mtlfast.engine.config import load_config
    from mtlfast.engine.trainer import _aux_tasks, build_split, resolve_workers

    config = load_config(args.config, args.overrides)
    _check_out_folder(args.out)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: expected a number of samples >= 1, got {args.limit}")
    dataset = canonical_dataset(config["data"]["dataset"])
    tasks = list(check_tasks(config["data"]["tasks"], dataset))
    aux = _aux_tasks(config["model"], tasks, dataset)  # training also reads them
    workers = resolve_workers(config["data"]["num_workers"], dataset)
    reports = {}
    for split in args.splits:
        data = build_split(config, split, tasks + aux if split == "train" else tasks)
        print(f"{dataset} {split} ({getattr(data, 'root', 'rendered')}), tasks {', '.join(data.tasks)}: "
              f"{len(data)} samples", flush=True)
        reports[split] = check_split(data, dataset, workers=workers, limit=args.limit)
        print(format_report(split, reports[split]), flush=True)
    if args.out:
        write_json_atomically(args.out, {"dataset": dataset, "root": config["data"]["root"], "splits": reports})
        print(f"wrote {args.out}")
    failed = sum(len(r["errors"]) for r in reports.values())
    if failed:
        print(f"mtlfast data: {failed} sample(s) failed to decode (listed above)", file=sys.stderr)
    return 1 if failed else 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    """Trains the ``single_task`` model of each task of a config and writes the measured baseline file."""
    import copy
    import math
    import shlex

    import yaml

    from mtlfast._files import write_text_atomically
    from mtlfast.data import canonical_dataset, check_tasks
    from mtlfast.data.tasks import TASK_INFO
    from mtlfast.engine.config import load_config
    from mtlfast.engine.trainer import Trainer
    from mtlfast.models.registry import model_options

    config = load_config(args.config, args.overrides)
    _check_out_folder(args.out)  # before the runs: a bad --out must not cost them
    dataset = canonical_dataset(config["data"]["dataset"])
    tasks = list(check_tasks(config["data"]["tasks"], dataset))
    allowed = set(model_options("single_task"))
    kwargs = {k: v for k, v in config["model"]["kwargs"].items() if k in allowed}
    dropped = sorted(set(config["model"]["kwargs"]) - set(kwargs))
    if dropped:
        print(f"mtlfast baseline: model.kwargs {', '.join(dropped)} belong to {config['model']['name']!r}, "
              f"not single_task; left out")
    measured: dict[str, dict[str, float]] = {}
    trainer = None
    try:
        for task in tasks:
            cfg = copy.deepcopy(config)
            cfg["data"]["tasks"] = [task]
            cfg["model"]["name"], cfg["model"]["kwargs"] = "single_task", copy.deepcopy(kwargs)
            cfg["output_dir"] = os.path.join(config["output_dir"], "single_task", task)
            cfg["eval"]["baseline"] = None
            last = os.path.join(cfg["output_dir"], "last.pt")
            resume = last if args.resume and os.path.exists(last) else None
            print(f"-- single_task {task}: {cfg['model']['backbone']} on {dataset}, "
                  f"{cfg['train']['iterations']} iterations, run in {cfg['output_dir']}"
                  + (f" (resuming {last})" if resume else ""), flush=True)
            # one Trainer per task; the process group (torchrun) is shared and closed after the last task
            trainer = Trainer(cfg, resume=resume, progress=not args.no_progress)
            trainer.train()
            if trainer.dist.is_main:
                rows = trainer.log.read("eval")
                if rows and int(rows[-1]["iteration"]) == trainer.iteration:  # evaluated at the end already
                    flat = {k: v for k, v in rows[-1].items() if k != "iteration"}
                else:
                    flat = trainer.evaluate()
                measured[task] = {k.split("/", 1)[1]: float(v) for k, v in flat.items() if k.startswith(task + "/")}
    finally:
        if trainer is not None:
            trainer.close()
    if trainer is None or not trainer.dist.is_main:
        return 0
    command = "mtlfast baseline" + (f" --config {args.config}" if args.config else "") + "".join(
        f" {shlex.quote(o)}" for o in args.overrides)
    primary = {t: {TASK_INFO[t].primary: measured[t][TASK_INFO[t].primary]} for t in tasks}
    unusable = {t: v for t, v in primary.items() if not all(math.isfinite(x) and x != 0 for x in v.values())}
    for task in unusable:
        del primary[task]
    used = copy.deepcopy(config)  # the config of the runs, data.tasks aside
    used["model"]["name"], used["model"]["kwargs"], used["eval"]["baseline"] = "single_task", kwargs, None
    document = {
        "description": f"measured single-task baselines: single_task / {config['model']['backbone']} / {dataset}, "
                       f"{config['train']['iterations']} iterations",
        "source": f"measured by: {command}",
        "dataset": dataset,
        "backbone": config["model"]["backbone"],
        "runs": os.path.join(config["output_dir"], "single_task"),
        "metrics": primary,
        "all_metrics": measured,
        "config": used,
    }
    header = ("# Single-task baselines measured by `mtlfast baseline` (one single_task model per task of data.tasks,\n"
              "# trained with `config` below and evaluated on its validation split), for Δm: use this file as\n"
              "# eval.baseline=<file>. `metrics` holds the metric Δm uses per task (as MTI-Net); `all_metrics`\n"
              "# what the evaluation reported (edit `metrics` to compare others).\n"
              f"# Command: {command}\n")
    write_text_atomically(args.out, header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1000))
    print(yaml.safe_dump({"metrics": primary}, sort_keys=False).rstrip())
    print(f"wrote {args.out}")
    if unusable:
        print("mtlfast baseline: left out of `metrics` (a Δm baseline needs finite, non-zero values): "
              + ", ".join(f"{t}.{m} = {x}" for t, v in unusable.items() for m, x in v.items())
              + "; train longer (train.iterations) or drop the task", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (default: the embedded synthetic config)")
    train.add_argument("--config", help="YAML file (configs/<dataset>/<backbone>/<method>.yaml)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 data.batch_size=4")
    train.add_argument("--resume", help="checkpoint to resume from, or 'auto' for <output_dir>/last.pt if present")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on its validation set")
    evaluate.add_argument("--checkpoint", required=True,
                          help="checkpoint to evaluate (its config names the model and the data)")
    evaluate.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument("--out", help="write the metrics (and each segmentation task's per-class IoU) as JSON here")
    evaluate.add_argument("--samples", help="write a PNG of sample predictions here")
    evaluate.add_argument("--save-predictions", metavar="DIR",
                          help="write every image's prediction per task to DIR/<task>/<image id>.png|.npy, in the "
                               "encoding of the dataset's label files (edge and saliency: 8-bit probabilities, the "
                               "input of the MATLAB SEISM edge evaluation)")
    evaluate.set_defaults(func=_cmd_eval)

    score = sub.add_parser("score", help="metrics of saved predictions (mtlfast eval --save-predictions) against "
                                         "the validation labels")
    score.add_argument("--predictions", required=True, metavar="DIR", help="folder holding <task>/<image id>.png|.npy")
    score.add_argument("--config", help="YAML file naming the data (default: the synthetic config)")
    score.add_argument("--checkpoint", help="take the data settings from this checkpoint's config instead")
    score.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=/data data.tasks=[semseg]")
    score.add_argument("--out", help="write the metrics (and each segmentation task's per-class IoU) as JSON here")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(func=_cmd_score)

    baseline = sub.add_parser("baseline", help="train the single_task model of each task of a config and write "
                                               "the measured baseline file for Δm")
    baseline.add_argument("--config", help="YAML file; its data.tasks, backbone, data, optim and train settings are "
                                           "used, model.name becomes single_task (default: the synthetic config)")
    baseline.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.iterations=1000")
    baseline.add_argument("--out", required=True, help="baseline file to write (YAML), for eval.baseline=<file>")
    baseline.add_argument("--resume", action="store_true",
                          help="resume a task's run from <output_dir>/single_task/<task>/last.pt when it exists")
    baseline.add_argument("--no-progress", action="store_true", help="no progress bar")
    baseline.set_defaults(func=_cmd_baseline)

    data = sub.add_parser("data", help="decode every sample of a config's dataset once: sizes, label statistics "
                                       "and the files that fail, before a long run meets them")
    data.add_argument("--config", help="YAML file naming the data (default: the synthetic config)")
    data.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=/data")
    data.add_argument("--splits", nargs="+", choices=["train", "val"], default=["train", "val"],
                      help="splits to read (default: both)")
    data.add_argument("--limit", type=int, help="read only the first N samples of each split")
    data.add_argument("--out", help="write the report as JSON here")
    data.set_defaults(func=_cmd_data)

    info = sub.add_parser("info", help="versions, built extensions, devices, backend per op")
    info.add_argument("--models", action="store_true",
                      help="also print the parameter/FLOP table of every model at the papers' input sizes")
    info.add_argument("--no-flops", action="store_true", help="with --models: parameters only (faster)")
    info.add_argument("--activations", action="store_true",
                      help="with --models: the activation bytes one training forward keeps for the backward on "
                           "the reference path, the GPU kernel path and with every activation checkpoint on (decoder "
                           "stages, ViT/Swin blocks; plus its largest recomputation) (exact, counted on meta "
                           "tensors; no GPU needed)")
    info.add_argument("--blocks", action="store_true",
                      help="with --models: also each model's saved activations per block (backbone, every mtlfast.nn "
                           "block) and path, as with --activations (which it implies)")
    info.add_argument("--cases", metavar="REGEX",
                      help="with --models: only the models whose method-backbone-dataset matches, e.g. '^sem-vit_b'")
    info.add_argument("--out", metavar="FILE", help="with --models: also write the table as JSON, with versions")
    info.set_defaults(func=_cmd_info)

    bench = sub.add_parser("bench", help="microbenchmarks of the ops against eager, torch.compile, SDPA...")
    bench.add_argument("ops", nargs="*", help="ops to benchmark (default: all registered)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    bench.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    bench.add_argument("--modes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    bench.add_argument("--cases", help="regular expression selecting case names")
    bench.add_argument("--out", help="results folder (<out>/<device>/<op>.json; default bench/results, none for "
                                     "--quick and CPU --models checks); '' to not write")
    bench.add_argument("--quick", action="store_true",
                       help="few repetitions (smoke test, not for reporting: marked quick in a result file, never "
                            "resumed)")
    bench.add_argument("--budget", type=float, metavar="SECONDS",
                       help="start no case (with --models: no model setting) after this many seconds; the ones "
                            "left are recorded as not run (exit status 3)")
    bench.add_argument("--resume", action="store_true",
                       help="keep the cases an earlier result file of the same sources (harness.source_fingerprint), "
                            "dtype and modes measured; run only the others")
    bench.add_argument("--report", metavar="DIR",
                       help="check the issues' targets on the result files in DIR (bench/results/<device>) and "
                            "print them as a Markdown table; measures nothing")
    bench.add_argument("--models", action="store_true",
                       help="model-level benchmark: training step and inference, kernel vs reference path")
    bench.add_argument("--max-batch", action="store_true", help="with --models: search the largest batch per path")
    bench.add_argument("--compile", action="store_true",
                       help="with --models: also the reference and kernel paths under torch.compile (Inductor)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command. An error (bad path, config, checkpoint, dataset, missing dependency...) is printed as one
    line naming the command, exit status 1; MTLFAST_TRACEBACK=1 raises it with its traceback instead."""
    parser = build_parser()
    # key=value overrides may also follow an option (train output_dir=x --no-progress optim.lr=1e-4): argparse
    # gives the positional list only its first run of them
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except Exception as error:
        if os.environ.get("MTLFAST_TRACEBACK", "0") not in ("", "0"):
            raise
        print(f"mtlfast {args.command}: {type(error).__name__}: {error}\n"
              "(MTLFAST_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
