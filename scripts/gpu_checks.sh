#!/usr/bin/env bash
# The GPU checks (tests/gpu, marker gpu) in one call, for a session that has a CUDA machine:
#   bf16 SFT/DPO steps, flash-attention padding-free packing, FSDP2 over 2 GPUs (when there are 2),
#   QLoRA on CUDA, Liger kernels. Run from the repository root (or anywhere: it cds there).
#   Extra arguments go to pytest, e.g. scripts/gpu_checks.sh -k flash
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi || echo "nvidia-smi: not available"
python - <<'PY'
import importlib.util
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}, "
      f"{torch.cuda.device_count()} device(s)")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}, bf16 {torch.cuda.is_bf16_supported()}")
for name in ("flash_attn", "liger_kernel", "bitsandbytes", "deepspeed"):
    print(f"  {name}: {'installed' if importlib.util.find_spec(name) else 'not installed (its tests skip)'}")
PY
python -m pytest -m gpu tests/gpu -x -q -p no:cacheprovider -rs "$@"
