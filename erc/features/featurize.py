"""The featurize stage's work: every feature set that params.yaml's `featurize` section asks for, for one dataset.

Text sets (`featurize.encoders`) come from the prepared table's text; audio sets (`featurize.acoustic`:
openSMILE and librosa; `featurize.speech`: transformers speech encoders) come from the media that
`featurize.media.<dataset>` places (`erc.data.media`). Each set is streamed into `<out>/<name>.npy`
(`erc.features.text.feature_file`); the caller writes `out` atomically.

A bad media file stops the stage with one line naming it (`on_bad_media: error`, the default), or
(`on_bad_media: mask`) its row is zeros, marked absent in `<name>.present.npy` like any missing modality,
and counted in `<name>.json` (`missing`, `bad_media`) and on the terminal.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm import tqdm

from erc.data.canonical import Prepared
from erc.data.media import media_items
from erc.errors import ErcDataError
from erc.features.acoustic import EXTRACTORS, extract_in_pool, extract_item, start_pool_worker
from erc.features.audio import load_audio
from erc.features.speech import SpeechEncoder
from erc.features.text import TextEncoderSpec, feature_file, featurize_text
from erc.sources import DatasetFiles


def audio_extractors(params: dict, wanted: list[str] | None, *, source="params.yaml") -> dict:
    """{name: extractor} for the acoustic and speech sets in `featurize` (those in `wanted`, if given)."""
    specs = {**{n: ("acoustic", s) for n, s in (params.get("acoustic") or {}).items()},
             **{n: ("speech", s) for n, s in (params.get("speech") or {}).items()}}
    unknown = sorted(set(wanted or []) - set(specs))
    if unknown:
        raise ErcDataError(source, f"media sets {unknown} are not in featurize.acoustic or featurize.speech")
    out = {}
    for name, (family, spec) in specs.items():
        if (wanted is not None and name not in wanted) or spec.get("finetune") is not None:
            continue  # a tuned speech encoder is stage 1's (erc.training.finetune)
        spec = dict(spec)
        try:
            if family == "acoustic":
                kind = spec.pop("kind", None)
                if kind not in EXTRACTORS:
                    raise ErcDataError(source, f"featurize.acoustic.{name}: kind must be one of {sorted(EXTRACTORS)}")
                out[name] = EXTRACTORS[kind](**spec)
            else:
                out[name] = SpeechEncoder(**spec)
        except (TypeError, ValueError) as e:
            raise ErcDataError(source, f"featurize.{family}.{name}: {str(e).splitlines()[0]}") from None
    return out


def media_workers(value, *, source="params.yaml") -> int:
    """`featurize.workers`: `auto` (or null) is this process's CPUs; otherwise a count >= 1."""
    if value in (None, "auto"):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ErcDataError(source, f"featurize.workers must be auto or an integer >= 1, not {value!r}")
    return value


@contextlib.contextmanager
def _extracted(items, read, extractors: dict, workers: int):
    """Each item's `Extracted`, in order. With workers > 1 (audio), the extractors that can run in worker
    processes (`in_worker_processes`) do, reading the files there; the rest get the waveform back here."""
    pooled = {n: ex for n, ex in extractors.items() if getattr(ex, "in_worker_processes", False)}
    if workers <= 1 or not pooled or read is not load_audio or len(items) < 2 * workers:
        yield (extract_item(read, extractors, item, False) for item in items)
        return
    here = {n: ex for n, ex in extractors.items() if n not in pooled}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_pool_worker,
                               initargs=(pooled, bool(here)))

    def merged():
        for done in pool.map(extract_in_pool, items, chunksize=4):
            if done.error is None and here:
                more = extract_item(lambda waveform: waveform, here, done.data, False)
                done = done._replace(error=more.error, vectors={**done.vectors, **more.vectors},
                                     seconds={**done.seconds, **more.seconds})
            yield done

    try:
        yield merged()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def featurize_media(items, extractors: dict, directory, *, source: list[str], on_bad_media: str = "error",
                    specs: dict | None = None, modality: str = "audio", progress: bool = True,
                    workers: int = 1) -> dict:
    """Run every extractor on every item into `<directory>/<name>.npy`; figures back.

    Audio: each file is read once (16 kHz mono) and every extractor gets the waveform; with `workers` > 1 the
    acoustic sets run in that many processes (the same numbers: each row is computed alone). Video: every
    extractor gets the item's path (it samples its own frames). `seconds` per set are CPU seconds summed over
    the processes; `wall_seconds` is the whole pass.
    """
    if on_bad_media not in ("error", "mask"):
        raise ErcDataError("params.yaml", f"on_bad_media must be error or mask, not {on_bad_media!r}")
    read = load_audio if modality == "audio" else (lambda item: item.path)
    seconds = {name: 0.0 for name in extractors}
    audio_seconds, load_seconds, bad = 0.0, 0.0, []
    wall = time.perf_counter()
    with contextlib.ExitStack() as stack:
        sets = {name: stack.enter_context(feature_file(
                    directory, name, modality, rows=len(items), dim=len(ex.names), source=source,
                    info={**(specs or {}).get(name, {}), **({"columns": ex.names} if len(ex.names) <= 200 else {})},
                    with_mask=True))
                for name, ex in extractors.items()}
        results = stack.enter_context(_extracted(items, read, extractors, workers))
        for row, done in enumerate(tqdm(results, total=len(items), desc=modality, unit="file", disable=not progress)):
            if done.error is not None:
                if on_bad_media == "error":
                    raise done.error
                bad.append(str(done.error))
                for fs in sets.values():
                    fs.values[row] = 0.0
                    fs.present[row] = False
                continue
            audio_seconds += done.audio_seconds
            load_seconds += done.load_seconds
            for name, vector in done.vectors.items():
                seconds[name] += done.seconds[name]
                fs = sets[name]
                if not np.isfinite(vector).all():  # e.g. a pitch statistic of a clip with no voiced frame
                    vector = np.nan_to_num(vector, nan=0.0, posinf=0.0, neginf=0.0)
                    fs.info["nonfinite_rows_zeroed"] = fs.info.get("nonfinite_rows_zeroed", 0) + 1
                fs.values[row] = vector
        for fs in sets.values():
            fs.info["bad_media"] = len(bad)
    wall = time.perf_counter() - wall
    figures = {"files": len(items), "bad_media": len(bad), "bad_media_first": bad[:5], "audio_seconds": audio_seconds,
               "load_seconds": load_seconds, "seconds": seconds, "workers": workers, "wall_seconds": wall,
               "audio_seconds_per_s": {n: audio_seconds / max(s, 1e-9) for n, s in seconds.items()},
               "audio_seconds_per_wall_s": audio_seconds / max(wall, 1e-9)}
    return figures


def featurize_dataset(dataset: str, prepared: Prepared, table_source: str, params: dict, out, *,
                      source="params.yaml", progress: bool = True, timings: dict | None = None):
    """Write every feature set of `dataset` into `out`; yields one line per set for the terminal. `timings`, if
    given, gets each text set's and each media pass's figures (by set name, and `audio` / `video`)."""
    timings = {} if timings is None else timings
    section = params["featurize"]
    table = prepared.table
    if table["text"].str.len().sum() == 0:
        yield f"{dataset}: no text, text encoders skipped"
    else:
        for name, spec in (section.get("encoders") or {}).items():
            spec = TextEncoderSpec.from_params(spec, source=source)
            if spec.finetune is not None:
                continue  # a tuned encoder is stage 1's (erc.training.finetune)
            timing = timings[name] = featurize_text(table, out, name, spec, batch_size=section.get("batch_size", 64),
                                                    source=[table_source], progress=progress)
            yield f"{dataset} {name}: {len(table)} utterances, {timing['utterances_per_s']:.0f} utterances/s"
    media = (section.get("media") or {}).get(dataset)
    if media is None:
        return
    files = DatasetFiles(params["datasets"][dataset]["files"]) if dataset in params.get("datasets", {}) else None
    items = media_items(table, media, files, source=source)
    extractors = audio_extractors(section, media.get("sets"), source=source)
    specs = {**(section.get("acoustic") or {}), **(section.get("speech") or {})}
    if extractors:
        figures = featurize_media(items, extractors, out, source=[f"media:{media['layout']}"],
                                  on_bad_media=section.get("on_bad_media", "error"), specs=specs, progress=progress,
                                  workers=media_workers(section.get("workers"), source=source))
        timings["audio"] = figures
        for name, rate in figures["audio_seconds_per_s"].items():
            yield (f"{dataset} {name}: {figures['files']} files ({figures['audio_seconds']:.0f} s of audio), "
                   f"{rate:.1f} s of audio per CPU second")
        yield (f"{dataset}: all {len(extractors)} audio sets in {figures['wall_seconds']:.0f} s "
               f"({figures['workers']} processes, {figures['audio_seconds_per_wall_s']:.1f} s of audio per s)")
        if figures["bad_media"]:
            yield f"{dataset}: {figures['bad_media']} bad media files masked (first: {figures['bad_media_first'][0]})"
    if media.get("visual"):  # visual sets from the video's frames, by name (featurize.visual)
        from erc.features.vision import FrameEncoder

        visual = section.get("visual") or {}
        unknown = sorted(set(media["visual"]) - set(visual))
        if unknown:
            raise ErcDataError(source, f"media visual sets {unknown} are not in featurize.visual")
        figures = featurize_media(items, {n: FrameEncoder(**visual[n]) for n in media["visual"]}, out,
                                  source=[f"media:{media['layout']}"], on_bad_media=section.get("on_bad_media", "error"),
                                  specs=visual, modality="video", progress=progress)
        timings["video"] = figures
        for name, spent in figures["seconds"].items():
            yield f"{dataset} {name}: {figures['files']} videos, {figures['files'] / max(spent, 1e-9):.1f} videos per s"
