"""Suite (d), full suite only: sample quality against steps, fp32 and int8, with mdx-eval's scores.

For each model file (the shipped fp32 model and its -int8 sibling) and each sampler setting --
DDIM and DPM-Solver++ at 5, 10, 20 and 50 steps, DDPM over all T steps -- `n` images are sampled
(image i of class i mod K, the model's recommended guidance, seed 0) with
`mdx.runtime.evaluate.sample_with_model` and scored with `mdx.runtime.evaluate.score`: the FD
in the emoji16 classifier's feature space, its floor for that n (what a perfect sampler would
get) and the conditional accuracy. These are exactly `mdx-eval --model FILE --sampler S
--steps N -n n`'s numbers. The quality of a model depends on its training, so this suite needs
a trained model (`--model`, default models/emoji16.onnx); the random-init default network
would score nothing meaningful.
"""

from __future__ import annotations

import time
from pathlib import Path

from mdx.bench.records import make_record

CPU = "CPUExecutionProvider"
STEPS = (5, 10, 20, 50)
DEFAULT_N = 270  # 30 per class; the floor is reported for the same n


def settings(T: int) -> list[tuple[str, int]]:
    return [(s, n) for s in ("ddim", "dpmpp") for n in STEPS] + [("ddpm", T)]


def run_quality(model_files: dict[str, Path], *, threads: int, n: int = DEFAULT_N, seed: int = 0,
                budget=None, log=print, network: str | None = None) -> list[dict]:
    """Quality records for each precision -> model file."""
    try:
        from mdx.runtime import evaluate
    except ImportError as e:
        return [make_record("quality", "onnxruntime", CPU, p, n, skipped=f"mdx.runtime.evaluate unavailable: {e}")
                for p in model_files]
    records = []
    try:
        clf = evaluate.Classifier(evaluate.DEFAULT_CLASSIFIER, threads=threads)
        real = evaluate.real_reference(clf)
    except evaluate.EvalError as e:
        return [make_record("quality", "onnxruntime", CPU, p, n, skipped=f"mdx-eval not usable: {e}")
                for p in model_files]
    from mdx.runtime.session import OnnxDenoiser

    per_image_step = 0.002  # seconds per image per step (x2 with guidance), until measured
    for precision, path in model_files.items():
        den = OnnxDenoiser.load(path, provider=CPU, threads=threads)
        T = den.info.schedule.num_train_timesteps
        guidance = float((den.info.recommended or {}).get("guidance", 1.0))
        del den
        for sampler, steps in settings(T):
            base = dict(sampler=sampler, steps=steps, guidance=guidance, network=network or Path(path).name,
                        model_file=Path(path).name, seed=seed)
            expected = 1.2 * per_image_step * n * steps * (2 if guidance != 1.0 else 1) + 3
            if budget is not None and not budget.allows(expected):
                records.append(make_record("quality", "onnxruntime", CPU, precision, n,
                                           skipped=budget.reason(f"quality {sampler}-{steps}", expected), **base))
                continue
            t0 = time.perf_counter()
            images, labels, info = evaluate.sample_with_model(
                str(path), sampler=sampler, steps=steps, guidance=guidance, eta=0.0, seed=seed, n=n, provider=CPU,
                threads=threads, class_names=clf.class_names)
            sampling_s = time.perf_counter() - t0
            per_image_step = sampling_s / (n * steps * (2 if guidance != 1.0 else 1))
            result = evaluate.score(images, labels, clf, real)
            rec = make_record("quality", "onnxruntime", CPU, precision, n, fd=result["fd"],
                              fd_floor=result["floor"]["fd"], fd_floor_std=result["floor"]["std"],
                              conditional_accuracy=result["conditional_accuracy"],
                              classifier_holdout_accuracy=result["classifier_holdout_accuracy"],
                              sampling_s=round(sampling_s, 3), images_per_s=n / sampling_s, **base)
            records.append(rec)
            log(f"  quality {precision} {sampler}-{steps}: FD {result['fd']:.2f} (floor "
                f"{result['floor']['fd']:.2f}), accuracy {result['conditional_accuracy']:.3f}, {sampling_s:.1f} s")
    return records
