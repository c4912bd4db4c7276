"""Build the cluster test tier's programs from the Go module proxy, cached by version.

Versions live only in pyproject.toml [tool.simpo-interleave.pins]. The binaries land in
~/.cache/simpo-interleave/bin/<hash of pins and Go version>/ (SIMPO_CONTROL_PLANE_CACHE overrides the root),
so a second run finds them and takes seconds. Run: python tests/cluster/build_control_plane.py (or make control-plane)

Measured on this project's 2-core machine, shared with other work, empty Go caches: about 25 minutes in all
(kube-apiserver alone 10.5, kube-controller-manager 2, kwok 4, JobSet 3, fake-gcs-server 2, etcd 1.5, the rest
under a minute each); with the cache present: under a second.

Kueue (its manager, CRDs and webhook configuration) has a cache directory of its own, kueue-<hash of its pin and
Go version>/ beside the others, so adding or moving its pin never invalidates the six programs above. Its build
(`go install sigs.k8s.io/kueue/cmd/kueue`, k8s client libraries v0.35 that the others do not share) took 30 minutes
of wall time on this machine while other builds and tests held it at load 15-27, but only 8.8 CPU-minutes (7.3 user,
1.5 system): about 5 minutes on an idle 2-core machine; 35 s with the Go build cache warm.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WRAPPERS = Path(__file__).resolve().parent / "go"
PIN_KEYS = ("kubernetes", "etcd", "jobset", "kwok", "helm", "fake_gcs_server")
KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
BINARIES = ("etcd", *KUBE_COMMANDS, "jobset", "kwok", "helm", "fake-gcs-server")
# Files the tests need from the Go module cache, copied next to the binaries.
JOBSET_CRD = "jobset.x-k8s.io_jobsets.yaml"
KUEUE_MODULE = "sigs.k8s.io/kueue"
KUEUE_ARTIFACTS = ("kueue", "kueue-crds", "kueue-webhooks.yaml")


def pins() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        all_pins = tomllib.load(f)["tool"]["simpo-interleave"]["pins"]
    return {k: all_pins[k] for k in PIN_KEYS}


def go_version() -> str:
    return subprocess.run(["go", "env", "GOVERSION"], check=True, capture_output=True, text=True).stdout.strip()


def kueue_pin() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["simpo-interleave"]["pins"]["kueue"]


def _cache_root() -> Path:
    return Path(os.environ.get("SIMPO_CONTROL_PLANE_CACHE", Path.home() / ".cache/simpo-interleave/bin"))


def bin_dir() -> Path:
    """Where the binaries for the current pins live (whether or not they are built yet)."""
    key = json.dumps({"pins": pins(), "go": go_version()}, sort_keys=True)
    return _cache_root() / hashlib.sha256(key.encode()).hexdigest()[:16]


def kueue_dir() -> Path:
    """Where Kueue for its pin lives: keyed by its own pin, so the directory above keeps its key."""
    key = json.dumps({"kueue": kueue_pin(), "go": go_version()}, sort_keys=True)
    return _cache_root() / f"kueue-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def missing_artifacts(directory: Path) -> list[str]:
    wanted = [*BINARIES, JOBSET_CRD, "kwok-stages"]
    return [name for name in wanted if not (directory / name).exists()]


def built_dir() -> Path:
    """The directory of built binaries; an error naming the build command if anything is missing (never a skip)."""
    directory = bin_dir()
    missing = missing_artifacts(directory)
    if missing:
        raise RuntimeError(f"control-plane binaries missing from {directory}: {missing}. Build them first: "
                           "make control-plane (python tests/cluster/build_control_plane.py)")
    return directory


def built_kueue_dir() -> Path:
    """Kueue's directory; an error naming the build command if anything is missing (never a skip)."""
    directory = kueue_dir()
    missing = [name for name in KUEUE_ARTIFACTS if not (directory / name).exists()]
    if missing:
        raise RuntimeError(f"Kueue missing from {directory}: {missing}. Build it first: "
                           "make control-plane (python tests/cluster/build_control_plane.py)")
    return directory


def go(*args: str, cwd: Path | None = None, env: dict | None = None) -> str:
    result = subprocess.run(["go", *args], cwd=cwd, env={**os.environ, **(env or {})},
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"go {' '.join(args)} (in {cwd or os.getcwd()}) failed:\n{result.stderr[-6000:]}")
    return result.stdout


def module_info(module: str, version: str) -> dict:
    return json.loads(go("mod", "download", "-json", f"{module}@{version}"))


def wrapper_is_current(wrapper: Path, module: str, version: str) -> bool:
    if not (wrapper / "go.mod").exists() or not (wrapper / "go.sum").exists():
        return False
    required = json.loads(go("mod", "edit", "-json", cwd=wrapper))["Require"] or []
    return any(r["Path"] == module and r["Version"] == version for r in required)


def write_wrapper(wrapper: Path, module: str, version: str, replaces: dict[str, str], tools: list[str]) -> None:
    """A module of our own that requires `module` and undoes its path replaces, so its commands can be built.

    The committed go.mod/go.sum are the output of this; they are regenerated only when the pin changes."""
    wrapper.mkdir(parents=True, exist_ok=True)
    lines = [f"// Generated by tests/cluster/build_control_plane.py from the pins in pyproject.toml.",
             f"module simpo-interleave/tests/cluster/go/{wrapper.name}", "", "go 1.26.0", "",
             f"require {module} {version}", ""]
    if replaces:
        lines += ["replace ("] + [f"\t{m} => {m} {v}" for m, v in sorted(replaces.items())] + [")", ""]
    lines += ["tool ("] + [f"\t{t}" for t in tools] + [")", ""]
    (wrapper / "go.mod").write_text("\n".join(lines))
    (wrapper / "go.sum").unlink(missing_ok=True)
    go("mod", "tidy", cwd=wrapper)


def staging_replaces(kubernetes_version: str) -> dict[str, str]:
    """k8s.io/kubernetes replaces each staging module by a path; the proxy serves them as v0.<minor>.<patch>."""
    gomod = Path(module_info("k8s.io/kubernetes", kubernetes_version)["GoMod"]).read_text()
    staging_version = "v0." + kubernetes_version.removeprefix("v1.")
    names = re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", gomod, flags=re.M)
    if not names:
        raise RuntimeError(f"no staging replaces found in k8s.io/kubernetes@{kubernetes_version}'s go.mod")
    return {name: staging_version for name in names}


def kube_ldflags(version: str) -> str:
    major, minor = version.removeprefix("v").split(".")[:2]
    settings = {"gitVersion": version, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean",
                "buildDate": "1970-01-01T00:00:00Z"}
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{k}={v}" for k, v in settings.items()]
    return " ".join(flags)


def timed(label: str, action) -> None:
    print(f"building {label} ...", flush=True)
    start = time.monotonic()
    action()
    print(f"built {label} in {time.monotonic() - start:.0f}s", flush=True)


def build(out: Path) -> None:
    p = pins()
    staging = out / ".staging"
    staging.mkdir(parents=True, exist_ok=True)

    def build_in_wrapper(wrapper: Path, package: str, name: str, ldflags: str = "-s -w") -> None:
        go("build", "-buildvcs=false", "-ldflags", ldflags, "-o", str(staging / name), package, cwd=wrapper)
        (staging / name).rename(out / name)

    def install(module_path: str, version: str, name: str) -> None:
        go("install", "-ldflags", "-s -w", f"{module_path}@{version}", env={"GOBIN": str(staging)})
        (staging / Path(module_path).name).rename(out / name)

    etcd = WRAPPERS / "etcd"
    if not wrapper_is_current(etcd, "go.etcd.io/etcd/server/v3", p["etcd"]):
        timed("etcd wrapper module", lambda: write_wrapper(
            etcd, "go.etcd.io/etcd/server/v3", p["etcd"], {}, ["go.etcd.io/etcd/server/v3"]))
    kube = WRAPPERS / "kubernetes"
    if not wrapper_is_current(kube, "k8s.io/kubernetes", p["kubernetes"]):
        timed("kubernetes wrapper module", lambda: write_wrapper(
            kube, "k8s.io/kubernetes", p["kubernetes"], staging_replaces(p["kubernetes"]),
            [f"k8s.io/kubernetes/cmd/{c}" for c in KUBE_COMMANDS]))

    # The proxy refuses to list JobSet's versions, which `go install module@version` needs; a wrapper does not.
    jobset = WRAPPERS / "jobset"
    if not wrapper_is_current(jobset, "sigs.k8s.io/jobset", p["jobset"]):
        timed("jobset wrapper module", lambda: write_wrapper(
            jobset, "sigs.k8s.io/jobset", p["jobset"], {}, ["sigs.k8s.io/jobset"]))

    kube_flags = kube_ldflags(p["kubernetes"])
    steps = {  # name -> (version, how to build it)
        "etcd": (p["etcd"], lambda: build_in_wrapper(etcd, "go.etcd.io/etcd/server/v3", "etcd")),
        **{c: (p["kubernetes"], lambda c=c: build_in_wrapper(kube, f"k8s.io/kubernetes/cmd/{c}", c, kube_flags))
           for c in KUBE_COMMANDS},
        "jobset": (p["jobset"], lambda: build_in_wrapper(jobset, "sigs.k8s.io/jobset", "jobset")),
        "kwok": (p["kwok"], lambda: install("sigs.k8s.io/kwok/cmd/kwok", p["kwok"], "kwok")),
        "helm": (p["helm"], lambda: install("helm.sh/helm/v3/cmd/helm", p["helm"], "helm")),
        "fake-gcs-server": (p["fake_gcs_server"], lambda: install(
            "github.com/fsouza/fake-gcs-server", p["fake_gcs_server"], "fake-gcs-server")),
    }
    for name, (version, step) in steps.items():
        if (out / name).exists():
            print(f"cached {name} {version}", flush=True)
        else:
            timed(f"{name} {version}", step)

    jobset_src = Path(module_info("sigs.k8s.io/jobset", p["jobset"])["Dir"])
    shutil.copyfile(jobset_src / "config/components/crd/bases" / JOBSET_CRD, out / JOBSET_CRD)
    kwok_src = Path(module_info("sigs.k8s.io/kwok", p["kwok"])["Dir"])
    shutil.rmtree(out / "kwok-stages", ignore_errors=True)
    shutil.copytree(kwok_src / "kustomize/stage", out / "kwok-stages")
    shutil.rmtree(staging)


def build_kueue(out: Path) -> None:
    """The manager (the module has no path replaces, so `go install module@version` builds it), its CRDs and its
    webhook configuration, from the module's own config/."""
    version = kueue_pin()
    staging = out / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    if not (out / "kueue").exists():
        def install() -> None:
            go("install", "-ldflags", "-s -w", f"{KUEUE_MODULE}/cmd/kueue@{version}", env={"GOBIN": str(staging)})
            (staging / "kueue").rename(out / "kueue")
        timed(f"kueue {version}", install)
    source = Path(module_info(KUEUE_MODULE, version)["Dir"]) / "config/components"
    shutil.rmtree(out / "kueue-crds", ignore_errors=True)
    shutil.copytree(source / "crd/bases", out / "kueue-crds")
    (out / "kueue-crds").chmod(0o755)  # the module cache is read-only; a rebuild must be able to replace the copy
    shutil.copyfile(source / "webhook/manifests.yaml", out / "kueue-webhooks.yaml")
    shutil.rmtree(staging)


def main() -> None:
    out = bin_dir()
    print(f"control plane pins: {pins()}  ->  {out}", flush=True)
    start = time.monotonic()
    if missing_artifacts(out):
        out.mkdir(parents=True, exist_ok=True)
        build(out)
    still_missing = missing_artifacts(out)
    if still_missing:
        sys.exit(f"build finished but these are missing from {out}: {still_missing}")
    kueue = kueue_dir()
    print(f"kueue {kueue_pin()}  ->  {kueue}", flush=True)
    if any(not (kueue / name).exists() for name in KUEUE_ARTIFACTS):
        kueue.mkdir(parents=True, exist_ok=True)
        build_kueue(kueue)
    built_kueue_dir()
    print(f"control plane ready in {time.monotonic() - start:.1f}s: {out} and {kueue}", flush=True)


if __name__ == "__main__":
    main()
