"""What ``train`` leaves: its output set (``MODEL.joblib``, ``.metrics.json``, ``.report.txt``, ``.misclassified.csv``, ``.confusion.png``), published together (``core.outputsets``), and its printed summary."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.classical.bundle import write_bundle
from pipeline.classical.fitting import Fitted, scale_note
from pipeline.classical.models import MODELS
from pipeline.report.metrics import accuracy_text, csv_text, rough_warning
from pipeline.core.outputs import write_json_atomic, write_text_atomic
from pipeline.core.outputsets import publish

#: The files of a model's set, in the order they are moved into place: the bundle, which predict and evaluate open, last.
KINDS = {"metrics": "metrics.json", "report": "report.txt", "misclassified": "misclassified.csv", "confusion": "confusion.png", "bundle": "joblib"}


def output_paths(output: Path, model: str) -> dict[str, Path]:
    """Where ``train`` writes for ``model``: ``bundle``, ``metrics``, ``report``, ``confusion``, ``misclassified``."""
    return {kind: Path(output) / f"{model}.{ext}" for kind, ext in KINDS.items()}


def fmt_params(params: dict) -> str:
    """``C=0.01, max_iter=100``: a search's choice, as the report and the summary print it."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def write_outputs(paths: dict, bundle: dict, metrics: dict, report: str, names: list[str], test_source: dict, wrong: list) -> None:
    """Write the model's set into a staging folder, then publish it as a whole (the caller holds the bundle's lock).

    Raises:
        PipelineError: a file could not be written (the previous set is left whole).
    """
    from pipeline.report import plots

    model = metrics["model"]
    header = [
        f"model: {model} ({MODELS[model].title}), best {fmt_params(metrics['best_params'])}, mode {metrics['mode']}, pool {metrics['pool']}",
        f"features: {metrics['features']} ({metrics['n_train']} training rows)",
        f"test: {test_source['file']}" + (f" (stratified split, test size {test_source['test_size']}, seed {test_source['seed']})" if test_source["kind"] == "split" else "")
        + f", {metrics['n_test']} rows",
        f"{accuracy_text(metrics)}, macro-F1 {metrics['macro_f1']:.4f}",
        f"saved model: fitted on {metrics['final_model']['rows']} rows" + (" (refitted on every row after scoring)" if metrics["final_model"]["refit"] else ""),
        "",
    ]
    bundle_path = paths["bundle"]
    members = [p.name for p in paths.values()]
    with publish(bundle_path.parent, model, members, lock=bundle_path.name) as stage:
        staged = {kind: stage.path(p.name) for kind, p in paths.items()}
        write_bundle(staged["bundle"], bundle)
        write_json_atomic(staged["metrics"], metrics)
        write_text_atomic(staged["report"], "\n".join(header) + report)
        write_text_atomic(staged["misclassified"], csv_text(("path", "true", "predicted"), wrong))
        title = f"{model}: accuracy {metrics['accuracy']:.3f} on {metrics['n_test']} test rows"
        plots.confusion_matrix(np.asarray(metrics["confusion"]), names, staged["confusion"], title=title)


def print_summary(metrics: dict, fitted: Fitted, paths: dict) -> None:
    """The run's summary on stdout (a rough-estimate warning on stderr)."""
    cv = metrics["cv_score"]
    cv_text = "" if cv != cv else f", {'cv' if metrics['search']['kind'] == 'cv' else 'hold-out'} {cv:.3f}"
    print(
        f"{metrics['model']}: test {accuracy_text(metrics)}, macro-F1 {metrics['macro_f1']:.3f} "
        f"({metrics['mode']}, pool {metrics['pool']}, {fmt_params(metrics['best_params'])}{cv_text}, fit {fitted.fit_seconds:.1f} s)"
        + scale_note(fitted.estimator, metrics["best_params"])
    )
    final = metrics["final_model"]
    if final["refit"]:
        print(f"  the saved model is refitted on all {final['rows']} rows (scored above on the held-out split; --no-refit keeps the split's model)")
    for path, n in metrics.get("rejected", {}).items():
        if n:
            print(f"  note: {n} file{'s' if n > 1 else ''} of {path} could not be read at extraction: in no row, neither trained on nor scored (listed in its rejected/)")
    warning = rough_warning(metrics["n_scored"])
    if warning:
        print(warning, file=sys.stderr)
    print(f"  model   {paths['bundle']}")
    print(f"  report  {paths['report']}")
    print(f"  plot    {paths['confusion']}")
    print(f"  wrong   {paths['misclassified']}")
