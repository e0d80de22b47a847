#!/usr/bin/env bash
# Here (a machine with PyPI): the wheels the GPU machine's image lacks, into .whl/ (git-ignored), for Python 3.12.
# The versions are this venv's, so both sides run the same code. Then carry .whl (see the README's GPU section).
set -euo pipefail
cd "$(dirname "$0")/../.."
want="grpcio grpcio-health-checking protobuf pydantic pydantic_core pydantic-settings python-dotenv annotated-types
typing-inspection fastapi starlette uvicorn paho-mqtt gguf openai jiter distro sniffio annotated-doc typing_extensions
httpx2 httpcore2 truststore opentelemetry-api llguidance"
pins=$(.venv/bin/pip list --format=freeze | awk -F== -v want="$want" 'BEGIN{split(want,w," |\n"); for(i in w) k[tolower(w[i])]=1}
  {n=tolower($1); gsub("_","-",n); for (x in k) {y=x; gsub("_","-",y); if (n==y) print $1"=="$2}}')
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
# the demo model's GGUF (98 MB) travels in three calls of at most 64 MiB with the wheels and the tree:
# .gguf/part00 .. part02, each with .gguf/sha256 (the whole file's), so the GPU side knows when it is complete
gguf=$(.venv/bin/python -c "from partitioner.convert import find_demo_gguf; print(find_demo_gguf())")
rm -rf .gguf && mkdir -p .gguf && split -b 36M -d "$gguf" .gguf/part && sha256sum < "$gguf" | cut -d' ' -f1 > .gguf/sha256
du -sh .whl .gguf/*
