"""Predictions output: the text, CSV and JSON renderings, file names that are not valid UTF-8 written without loss, and recognising a file ``predict`` wrote.

File names are ``str`` decoded from the file system with ``surrogateescape`` (a byte that is
not valid UTF-8 becomes the code point U+DC80 + byte). Every format keeps them exactly:
text and CSV are written as bytes, such code points turned back into the original bytes
(so ``cut``, ``xargs`` or a CSV reader opening the file in binary find the file again);
JSON, which is ASCII here, carries them as ``\\udcXX`` escapes (``os.fsencode`` of the
parsed string gives the original bytes). Rendering and encoding cannot fail, so no
prediction is lost once the images are labelled.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import stat
import sys
from pathlib import Path

from pipeline.core.outputs import atomic_output

FORMATS = ("text", "csv", "json")
#: First line of the text format: marks a file as predictions (``-o`` replaces such a file without ``--overwrite``).
TEXT_MARKER = "# transfer-pipeline predictions: path, label, score (or ERROR and the reason)"
#: How each format begins; a file starting so was written by ``predict``.
_STARTS = (TEXT_MARKER + "\n", "path,label,score,", '[\n  {\n    "path": ')
#: The keys of a JSON record ``predict`` writes.
_JSON_KEYS = {"path", "label", "score", "error", "top", "probabilities"}
#: Encoding error handler for names: surrogate-escaped bytes back to the bytes, any other
#: lone surrogate (not from a file name) as a ``\\uXXXX`` escape.
NAME_ERRORS = "transfer-pipeline-names"


def _names_handler(exc: UnicodeError):
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for ch in exc.object[exc.start : exc.end]:
        code = ord(ch)
        out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}".encode()
    return bytes(out), exc.end


codecs.register_error(NAME_ERRORS, _names_handler)


def encode(text: str) -> bytes:
    """UTF-8 bytes of ``text``, file names that were not valid UTF-8 as their original bytes (never raises)."""
    return text.encode("utf-8", NAME_ERRORS)


#: Control characters (C0, C1, the Unicode line and paragraph separators) as escapes in the text format (one line per image: a newline in a file name must not start a row).
_CONTROL = {c: repr(chr(c))[1:-1] for c in (*range(32), *range(127, 160), 0x2028, 0x2029)}


def shown(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\t``, ``\\x1b``); other characters, undecodable bytes' escapes included, as they are."""
    return text.translate(_CONTROL)


def format_results(results: list[dict], fmt: str, *, top_k: int = 1, class_names: list[str] | None = None) -> str:
    """Render results as ``text`` (a marker line, then aligned columns), ``csv`` or ``json`` (a list of objects).

    CSV columns: ``path,label,score``, then ``label_2,score_2`` ... up to ``top_k``, then one
    ``p:CLASS`` column per class when ``class_names`` is given (the probabilities), then ``error``.
    Text: the K labels and scores on one line. JSON carries ``top`` and ``probabilities`` as the results have them.
    """
    if fmt == "json":
        return json.dumps(results, indent=2) + "\n"
    extra = range(1, top_k)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "score", *(f"{c}_{k + 1}" for k in extra for c in ("label", "score")), *(f"p:{n}" for n in class_names or ()), "error"])
        for r in results:
            top = r.get("top") or []
            cells = [r["path"], r["label"] or "", "" if r["score"] is None else f"{r['score']:.6g}"]
            for k in extra:
                cells += [top[k]["label"], f"{top[k]['score']:.6g}"] if k < len(top) else ["", ""]
            probs = r.get("probabilities") or {}
            cells += [f"{probs[n]:.6g}" if n in probs else "" for n in class_names or ()]
            w.writerow([*cells, r["error"] or ""])
        return buf.getvalue()
    results = [{**r, "path": shown(r["path"]), "label": r["label"] and shown(r["label"]), "error": r["error"] and shown(r["error"]),
                "top": [{**t, "label": shown(t["label"])} for t in r.get("top") or []]} for r in results]  # fmt: skip
    pw = min(60, max(len(r["path"]) for r in results))
    lw = max([len(r["label"]) for r in results if r["label"]] or [5])
    lines = [TEXT_MARKER]
    for r in results:
        if r["error"] is None:
            more = "".join(f"  {t['label']} {t['score']:.4f}" for t in r["top"][1:])
            lines.append(f"{r['path']:<{pw}}  {r['label']:<{lw}}  {r['score']:.4f}{more}")
        else:
            lines.append(f"{r['path']:<{pw}}  {'ERROR':<{lw}}  {r['error']}")
    return "\n".join(lines) + "\n"


def is_predictions_file(path: Path) -> bool:
    """Whether ``path`` is a regular file that begins like one ``predict`` writes (any of the formats)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(max(len(s) for s in _STARTS))
        if head.startswith(_STARTS[2].encode()):  # a JSON list of records is common: every record must be one predict writes
            records = json.loads(Path(path).read_text(errors="surrogateescape"))
            return isinstance(records, list) and all(isinstance(r, dict) and {"path", "label", "score", "error"} <= set(r) <= _JSON_KEYS for r in records)
    except (OSError, ValueError):
        return False
    return any(head.startswith(s.encode()) for s in _STARTS)


def write_predictions(text: str, output: Path | None) -> None:
    """Write rendered predictions to ``output`` (atomically) or, when None, to standard output, names as their bytes.

    Raises:
        PipelineError: the file could not be written (any previous file is left untouched).
    """
    data = encode(text)
    if output is not None:
        with atomic_output(Path(output)) as tmp:
            tmp.write_bytes(data)
        return
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (an io.StringIO): it holds the names as they are
        sys.stdout.write(text)
    else:
        buffer.write(data)
        buffer.flush()
