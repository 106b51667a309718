# Source on a GPU machine that cannot reach a package index, from the checkout's root:
#     . tests/gpu/device_env.sh && python -P -m pytest tests/gpu
# Installs carried wheels (.whl/, see benchmarks/RESULTS.md "Running on a lent GPU") into
# /tmp/site without touching the image's packages, and makes the checkout importable as `kvmesh`
# through a link (the folders are the package; pyproject.toml's package-dir), with no pip build.
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
fi
mkdir -p /tmp/kvmesh-root && ln -sfn "$PWD" /tmp/kvmesh-root/kvmesh
export PYTHONPATH="/tmp/site:/tmp/kvmesh-root${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/site/bin:$PATH"
# NVLink multicast stays off on shared hosts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
