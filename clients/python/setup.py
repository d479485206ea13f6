"""Generates the gRPC stubs before setuptools collects the packages.

`pip install ./clients/python` from a checkout regenerates them from `../../protos`; a
source tree without the protos (an sdist) ships the already generated ones.
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protogen import PROTO_DIR, generate, is_stale  # noqa: E402

if PROTO_DIR.is_dir() and is_stale():
    generate()
setup()
