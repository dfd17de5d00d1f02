"""Generates the gRPC stubs of proto/cachemgr/v1/cachemgr.proto into the package while it is
built (so `pip install ./client/python` needs no generated files in the repository), and builds
the KV mem-pool allocator (client/kv_mem_pool, C++ without dependencies) into the package as
cachemgr/_kv_mem_pool*.so: the library the vLLM connector hands to PyTorch's
CUDAPluggableAllocator (kv_mem_pool: true). It is not a Python extension module (it is loaded by
path, never imported). Optional: without a C++ compiler the package installs without it, and
kv_mem_pool then says so (or takes `mem_pool_library`)."""

import pathlib

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = PROTO_ROOT / "cachemgr" / "v1" / "cachemgr.proto"
KV_MEM_POOL = HERE.parent / "kv_mem_pool"


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        from grpc_tools import protoc  # build-time dependency (pyproject.toml)

        out = pathlib.Path(self.build_lib)
        (out / "cachemgr" / "v1").mkdir(parents=True, exist_ok=True)
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}",
                            f"--grpc_python_out={out}", str(PROTO)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {PROTO} ({code})")
        (out / "cachemgr" / "v1" / "__init__.py").touch()


# Paths relative to this directory, as setuptools wants them (the sources live beside it).
KV_MEM_POOL_LIBRARY = Extension(
    "cachemgr._kv_mem_pool",
    sources=["../kv_mem_pool/kv_mem_pool.cc", "../kv_mem_pool/region_allocator.cc"],
    include_dirs=[str(HERE.parent.parent)],
    language="c++",
    extra_compile_args=["-std=c++17", "-fvisibility=hidden"],
    # The C API only (no Python symbols: PyInit is neither defined nor needed).
    extra_link_args=[f"-Wl,--version-script={KV_MEM_POOL / 'kv_mem_pool.map'}"],
    depends=["../kv_mem_pool/kv_mem_pool.h", "../kv_mem_pool/region_allocator.h",
             "../kv_mem_pool/kv_mem_pool.map"],
    optional=True)

setup(cmdclass={"build_py": BuildWithStubs}, ext_modules=[KV_MEM_POOL_LIBRARY])
