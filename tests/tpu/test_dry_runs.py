"""The TPU launch scripts' --dry-run prints the commands they would run."""

import subprocess

import yaml


def _run(*args):
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=30)


BASE = ["--name", "ernie", "--zone", "us-east5-a", "--dry-run"]


def test_pod_lifecycle_dry_runs():
    r = _run("tpu/pod.sh", "create", *BASE, "--type", "v5p-64")
    assert r.returncode == 0 and "tpu-vm create ernie" in r.stdout and "v5p-64" in r.stdout
    r = _run("tpu/pod.sh", "install", *BASE, "--repo", "https://example.invalid/ernie_jax.git")
    assert r.returncode == 0 and "--worker=all" in r.stdout and "pip install" in r.stdout
    r = _run(
        "tpu/pod.sh",
        "launch",
        *BASE,
        "--config",
        "configs/ernie45_21b_a3b.yaml",
        "--workdir",
        "gs://b/r",
        "--set",
        "mesh.fsdp=-1",
        "--set",
        "mesh.data=1",
    )
    assert r.returncode == 0
    assert (
        "ERNIE_JAX_DISTRIBUTED=auto" in r.stdout
        and "ernie_jax.train" in r.stdout
        and "mesh.fsdp=-1" in r.stdout
    )
    r = _run("tpu/pod.sh", "logs", *BASE)
    assert r.returncode == 0 and "--worker=0" in r.stdout
    r = _run("tpu/pod.sh", "stop", *BASE, "--delete")
    assert r.returncode == 0 and "pkill -TERM" in r.stdout and "tpu-vm delete ernie" in r.stdout


def test_missing_arguments_fail_clearly():
    r = _run("tpu/pod.sh", "launch", *BASE)
    assert r.returncode == 2 and "launch needs --config" in r.stderr
    r = _run("tpu/pod.sh", "create", "--name", "x", "--zone", "z", "--bogus")
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr


def test_xpk_dry_run_and_jobset():
    r = _run(
        "tpu/xpk.sh",
        "--cluster",
        "c",
        "--type",
        "v5p-128",
        "--image",
        "img",
        "--config",
        "configs/ernie45_300b_a47b.yaml",
        "--workdir",
        "gs://b/r",
        "--set",
        "mesh.expert=8",
        "--dry-run",
    )
    assert r.returncode == 0 and "xpk workload create" in r.stdout and "mesh.expert=8" in r.stdout
    assert "mesh.dcn" not in r.stdout  # one slice: the flat mesh
    multi = ["--cluster", "c", "--type", "v5p-512", "--image", "i", "--config", "f.yaml", "--workdir", "w"]
    r = _run("tpu/xpk.sh", *multi, "--num-slices", "2", "--dry-run")
    assert "--num-slices 2" in r.stdout and "--set mesh.dcn.data=2" in r.stdout
    r = _run("tpu/xpk.sh", *multi, "--num-slices", "2", "--set", "mesh.dcn.fsdp=2", "--dry-run")
    assert "mesh.dcn.data" not in r.stdout and "mesh.dcn.fsdp=2" in r.stdout
    spec = yaml.safe_load(open("tpu/jobset.yaml"))
    container = spec["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python3", "-m", "ernie_jax.train"]
