"""Generates the gRPC stubs of proto/cachemgr/v1/cachemgr.proto into the package while it is
built (so `pip install ./client/python` needs no generated files in the repository)."""

import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = PROTO_ROOT / "cachemgr" / "v1" / "cachemgr.proto"


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


setup(cmdclass={"build_py": BuildWithStubs})
