"""Check rnnimg's training and inference path on a GPU, and measure it.

    python bench/gpu_check.py             # on a machine with CUDA (about 2 minutes on one H100/H200)
    python bench/gpu_check.py --no-ray    # the model measurements only
    python bench/gpu_check.py --smoke     # tiny sizes on the CPU: checks this script, measures nothing

Model side only (clips are random uint8 tensors already on the GPU; decoding is measured in
bench/ and /work/shared/ANCHORS.md), bf16 autocast, channels-last convolutions, cuDNN LSTM:

1. the default model, small CNN + LSTM(128), 8-frame 64x64 clips, batch 32 clips;
2. if torchvision is importable: ResNet-18 + LSTM(512), 16-frame 112x112 clips, batch 32 clips,
   the reference measured on an H200: 101,600 inference frames/s, 41,600 training frames/s.

Training steps run through ``rnnimg.train.train_one_epoch`` (the code ``rnnimg train`` runs:
uint8 converted on the GPU, loss, backward, clipping, AdamW, schedule); inference through the
model under ``torch.inference_mode``. Frames/s = steps x clips x frames / seconds, after warmup
steps, with the GPU synchronised around the timed part.

3. Unless --no-ray: the real Ray Train loop (``rnnimg.train.train``, 1 GPU worker, DataLoader
   decoding) for 2 epochs on a small synthetic archive, then the exported model loaded on the GPU.

On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rnnimg.models.crnn import CRNN, CRNNConfig  # noqa: E402
from rnnimg.models.layout import to_model_input  # noqa: E402
from rnnimg.tasks import get as get_task  # noqa: E402
from rnnimg.train.config import TrainConfig  # noqa: E402
from rnnimg.train.loop import make_optimizer, train_one_epoch  # noqa: E402

CLASSIFY = get_task("classify")

REFERENCE_H200 = {"resnet18": {"inference": 101_600, "training": 41_600}}


def measure(name: str, config: CRNNConfig, *, batch: int, steps: int, warmup: int, device: torch.device, amp_dtype) -> dict:
    """Training and inference frames/s of one model on random clips already on ``device``."""
    torch.manual_seed(0)
    model = CRNN(config).to(device)
    if device.type == "cuda":
        model.use_channels_last()
    t, size = config.frames_per_clip, config.frame_size
    clips = torch.randint(0, 256, (batch, t, size, size, 3), dtype=torch.uint8, device=device)  # (B, T, H, W, C)
    labels = torch.randint(0, config.num_classes, (batch,), device=device)
    optimizer, scheduler = make_optimizer(model, TrainConfig(epochs=1), warmup + steps)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    train_one_epoch(model, optimizer, ((clips, labels) for _ in range(warmup)), device, CLASSIFY, config, scheduler, amp_dtype=amp_dtype)
    sync()
    started = time.perf_counter()
    stats = train_one_epoch(model, optimizer, ((clips, labels) for _ in range(steps)), device, CLASSIFY, config, scheduler,
                            amp_dtype=amp_dtype)
    sync()
    train_s = time.perf_counter() - started

    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for _ in range(warmup):
            model(to_model_input(clips))
        sync()
        started = time.perf_counter()
        for _ in range(steps):
            clip_logits, _ = model(to_model_input(clips))
        sync()
        infer_s = time.perf_counter() - started
    frames = steps * batch * t
    return {
        "model": name,
        "input": f"{t}x{size}x{size}, batch {batch}",
        "training frames/s": frames / train_s,
        "inference frames/s": frames / infer_s,
        "final loss": float(stats["loss_sum"]) / int(stats["count"]),
        "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
    }


def ray_train_check(device_count: int) -> None:
    """Two epochs of the real Ray Train loop on one GPU worker, then load the exported model on the GPU."""
    from rnnimg import storage
    from rnnimg.synth import SynthConfig, make_archive
    from rnnimg.tasks import load_model
    from rnnimg.train import train

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as root:
        started = time.perf_counter()
        manifest = make_archive(os.path.join(root, "archive"), SynthConfig(videos=96, unlabelled=0, seed=1))
        print(f"synthetic archive: 96 videos in {time.perf_counter() - started:.0f} s")
        loader_workers = max(1, min(4, (os.cpu_count() or 2) - 2))
        config = TrainConfig(epochs=2, workers=1, use_gpu=True, batch_size=16, loader_workers=loader_workers, clips_per_video=2)
        started = time.perf_counter()
        result = train(manifest, os.path.join(root, "out"), "gpu-check", config)
        print(f"Ray Train on {device_count} visible GPU(s), 1 worker, {loader_workers} loader processes: "
              f"{time.perf_counter() - started:.0f} s for 2 epochs")
        for h in result.history:
            print(f"  epoch {h['epoch']}: train loss {h['train_loss']:.3f}, val acc {h['val_acc']:.3f}, "
                  f"{h['train_clips_per_s']:.0f} train clips/s (decode-bound), lr {h['lr']:.2e}")
        recorded = storage.read_json(os.path.join(result.model_uri, "metrics.json"))["train_config"]
        _, model, model_config, model_id = load_model(result.model_uri, "cuda")
        with torch.inference_mode():
            out, _ = model(torch.zeros(2, model_config.frames_per_clip, 3, model_config.frame_size, model_config.frame_size, device="cuda"))
        print(f"exported model {model_id} (trained with use_gpu={recorded['use_gpu']}, precision {recorded['precision']!r}) "
              f"loads and runs on {out.device}: logits {tuple(out.shape)}")
        print(f"report: {result.report_uri}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed training and inference steps per model (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (default 30)")
    parser.add_argument("--batch", type=int, default=32, help="clips per step (default 32)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Train loop check")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to check the script; measures nothing")
    args = parser.parse_args()

    if args.smoke:
        device, steps, warmup, batch, amp_dtype = torch.device("cpu"), 2, 1, 2, torch.bfloat16
        print("smoke mode: CPU, 2 steps per model; the numbers mean nothing")
    elif not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): nothing to check. "
              "Run this on a machine with an NVIDIA GPU and a CUDA build of torch.")
        return 0
    else:
        device, steps, warmup, batch, amp_dtype = torch.device("cuda"), args.steps, args.warmup, args.batch, torch.bfloat16
        torch.backends.cudnn.benchmark = True
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")

    rows = [measure("small CNN + LSTM(128)", CRNNConfig(), batch=batch, steps=steps, warmup=warmup, device=device, amp_dtype=amp_dtype)]
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a torchvision that does not match torch fails in many ways
        print(f"ResNet-18 + LSTM(512) skipped: torchvision is not importable here ({type(err).__name__}: {err})")
    else:
        resnet = CRNNConfig(backbone="resnet18", frame_size=112, frames_per_clip=16 if not args.smoke else 4, grid=1, feature_dim=512,
                            rnn_hidden=512)
        rows.append(measure("ResNet-18 + LSTM(512)", resnet, batch=batch, steps=steps, warmup=warmup, device=device, amp_dtype=amp_dtype))

    print()
    print("| model | clip input | training frames/s | inference frames/s | final loss | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['training frames/s']:,.0f} | {r['inference frames/s']:,.0f} | {r['final loss']:.3f} | {r['peak GiB']:.1f} |")
    resnet_rows = [r for r in rows if r["model"].startswith("ResNet-18")]
    if resnet_rows and not args.smoke:
        ref = REFERENCE_H200["resnet18"]
        r = resnet_rows[0]
        print(f"\nResNet-18 + LSTM(512) vs the H200 reference: training {r['training frames/s'] / ref['training']:.2f}x, "
              f"inference {r['inference frames/s'] / ref['inference']:.2f}x (an H100 is expected somewhat below 1.0)")

    if not args.smoke and not args.no_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("Ray Train check skipped: ray is not importable here")
        else:
            print()
            ray_train_check(torch.cuda.device_count())
    return 0


if __name__ == "__main__":
    sys.exit(main())
