"""Generate the gRPC code and `.pyi` stubs from `protos/` into `clients/python/lambdarec/`.

Run by `make protos` (`python clients/python/protogen.py`) and by this package's
`setup.py`, so the client and the server import the same generated modules,
`lambdarec.v1.*_pb2{,_grpc}` (the proto package's own name). Generated code is never
edited by hand, and never committed.

Each run writes a complete new generation beside the package and swaps it in by renaming
a symlink over `clients/python/lambdarec`, so a process importing the stubs meanwhile
(a server starting while `make protos` runs) sees the old package or the new one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "protos"
PACKAGE = Path("lambdarec") / "v1"
OUT_DIR = HERE / "lambdarec"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / PACKAGE).glob("*.proto"))


GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
"""What protoc writes per proto (`--python_out`, `--pyi_out`, `--grpc_python_out`)."""
GENERATION_PREFIX = ".generated."
"""Each run generates into `clients/python/.generated.<random>/lambdarec` (git-ignored);
`clients/python/lambdarec` is a symlink to the current one."""


def generated_files() -> list[Path]:
    """Every file a complete generation holds, relative to `clients/python`."""
    files = [Path("lambdarec") / "__init__.py", PACKAGE / "__init__.py", PACKAGE / "py.typed"]
    files += [PACKAGE / f"{p.stem}{suffix}" for p in proto_files() for suffix in GENERATED_SUFFIXES]
    return files


def is_stale() -> bool:
    """True when any generated file is missing or older than the newest proto."""
    protos = proto_files()
    newest = max((p.stat().st_mtime for p in protos), default=0.0)
    for rel in generated_files():
        out = HERE / rel
        if not out.is_file() or out.stat().st_mtime < newest:
            return True
    return False


def _new_generation() -> Path:
    """A new, empty generation directory with a unique name."""
    gen = Path(tempfile.mkdtemp(prefix=GENERATION_PREFIX, dir=HERE)).resolve()
    # mkdtemp makes it private (0700): readable by all like any source tree, since the
    # image installs as root and serves as another user (infra/Dockerfile).
    gen.chmod(0o755)
    return gen


def _swap_in(package: Path) -> Path | None:
    """Point `OUT_DIR` at `package` in one rename; returns the generation it replaced.

    rename(2) replaces a symlink atomically, so an importer sees the old package or the new
    one, never none or a mix. A real directory (a tree from before this layout, or an
    unpacked sdist's shipped stubs) cannot be renamed over: it is moved aside first, the
    one time the package is briefly absent.
    """
    previous: Path | None = None
    if OUT_DIR.is_symlink():
        previous = (OUT_DIR.parent / os.readlink(OUT_DIR)).resolve().parent
    elif OUT_DIR.exists():
        previous = _new_generation()
        OUT_DIR.rename(previous / OUT_DIR.name)
    link = HERE / f"{GENERATION_PREFIX}link.{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(package, HERE), target_is_directory=True)
    os.replace(link, OUT_DIR)
    return previous


def _remove_old_generations(keep: set[Path]) -> None:
    """Delete generations other than `keep` (the current one and the one it replaced: an
    importer that resolved the link just before the swap may still be reading that)."""
    for d in HERE.glob(f"{GENERATION_PREFIX}*"):
        if d.is_dir() and not d.is_symlink() and d.resolve() not in keep:
            shutil.rmtree(d, ignore_errors=True)


def generate() -> list[Path]:
    """Run protoc (grpc_tools) over every proto into a new generation and swap it in;
    returns the generated files."""
    import fcntl

    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files()
    if not protos:
        raise FileNotFoundError(f"no .proto files under {PROTO_DIR / PACKAGE}")
    # One generator at a time (`make protos` and a `pip install` may overlap): the cleanup
    # below must not delete a generation another run is still writing.
    with open(HERE / f"{GENERATION_PREFIX}lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        gen = _new_generation()
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            f"--pyi_out={gen}",
            *[str(p.relative_to(PROTO_DIR)) for p in protos],
        ]
        rc = protoc.main(args)
        if rc != 0:
            shutil.rmtree(gen, ignore_errors=True)
            raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
        for d in (gen / "lambdarec", gen / PACKAGE):
            (d / "__init__.py").write_text('"""Generated by protogen.py; do not edit."""\n')
        (gen / PACKAGE / "py.typed").write_text("")
        missing = [str(rel) for rel in generated_files() if not (gen / rel).is_file()]
        if missing:
            shutil.rmtree(gen, ignore_errors=True)
            raise RuntimeError(f"protoc did not write {', '.join(missing)}")
        previous = _swap_in(gen / "lambdarec")
        _remove_old_generations({gen} | ({previous.resolve()} if previous else set()))
    return sorted(p for p in OUT_DIR.rglob("*") if p.is_file())


def main(argv: list[str]) -> int:
    """`--if-stale`: only when a proto changed (what `make` runs, silently)."""
    if "--if-stale" in argv and not is_stale():
        return 0
    files = generate()
    print(f"generated {len(files)} files from {len(proto_files())} protos into {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
