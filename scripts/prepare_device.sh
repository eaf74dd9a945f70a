#!/usr/bin/env bash
# Prepare here what scripts/gpu_check.sh needs on a lent H200, which has no network:
#   .whl/          wheels (Python 3.12, x86-64) of the packages its image lacks, pinned to the
#                  versions this project is tested with (fastai, fire, wandb and their needs)
#   .dev/part-NN   the real CIFAR-100 folder as one tar, cut into 60 MB parts: one device call
#                  carries at most 64 MiB, so the data travels one part per call
# Both folders are git-ignored. Usage: scripts/prepare_device.sh [DATA_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
data_root=${1:-${CIFAR100_DATA:-../shared/data/cifar100}}
python=${PYTHON:-python3}

# Found by importing the package and running a short fit here, then removing what the device
# image already holds (its package list is in the device notes). protobuf and click are there
# too, in versions unknown here: these copies, known to work with this wandb, shadow them for
# the check's process only.
wheels=(
  fastai==2.8.12 fastcore==2.2.41 fastdownload==0.0.8 fastprogress==1.1.6 fasttransform==0.0.5
  plum-dispatch==2.9.0 beartype==0.23.1 fire==0.7.1 termcolor==3.3.0 wandb==0.31.0
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  platformdirs==4.14.9 sniffio==1.3.1 truststore==0.10.5 googleapis-common-protos==1.76.0
  httpx2==2.16.2 httpcore2==2.16.2 python-fasthtml==0.14.14 starlette==1.10.0
  itsdangerous==2.2.0 python-multipart==0.0.34 protobuf==7.36.2 click==8.5.1
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2
)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl && mkdir -p .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${wheels[@]}"

if [[ ! -f "$data_root/cifar-100-python/train" ]]; then
  echo "prepare_device: no CIFAR-100 under $data_root; pass the folder holding cifar-100-python" >&2
  exit 2
fi
rm -rf .dev && mkdir -p .dev
tar -C "$data_root" -cf - cifar-100-python/train cifar-100-python/test cifar-100-python/meta \
  | split -b 60000000 -d -a 2 - .dev/part-
(cd .dev && sha256sum part-* >parts.sha256)

echo "wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1)"
echo "data parts (carry one per call, in order):"
ls -l .dev/part-* | awk '{print "  " $NF, $5, "bytes"}'
