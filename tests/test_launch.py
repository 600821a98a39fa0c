"""`palm launch` and its launchers (palm/jobs/launch.py, launching.py, local.py, tpu_vm.py, gke.py): what
each launcher would run (golden files), that every JobSet is valid, that bad launcher settings are bad
input (exit 2, naming the key), and launching for real through fake `gcloud`, `kubectl` and `palm`
executables that record their calls and play a scenario: success, preemption, failure, bad input.

Golden files live in tests/golden/. After an intended change to what the launchers emit, regenerate them
and review the diff:

    PALM_UPDATE_GOLDEN=1 uv run pytest -n 0 tests/test_launch.py -k golden
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import yaml

from palm.cli import main
from palm.base.errors import PalmError
from palm.jobs.gke import LeaderLog, kubectl_commands, validate_jobset
from palm.jobs.tpu_vm import _LogFollower
from palm.jobs.launch import launch, plan_launch
from palm.jobs.launching import JobFailed, JobPreempted, JobStopped, WorkerRejected, worker_command
from palm.dag.workflow import load_spec
from tests.test_infra_docs import doc_commands, readme_variables

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
GOLDEN = ROOT / "tests" / "golden"
S540 = str(SPECS / "palm-540b.yaml")
FAST = ["--set", "infra.launcher.poll_seconds=0.01"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["launch", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------ golden files

#: A checkpoint of the 540B run, as the eval-new-checkpoints flow hands it to an evaluation job.
CKPT_540 = "gs://palm-runs/palm-540b/train/0123456789abcdef/checkpoints/255000"

#: The 540B run on GKE as infra/README.md's recipe has it ($GKE): its 6144 chips as 8 node pools of 8x8x12.
GKE_540 = shlex.split(readme_variables()["GKE"])

GKE_SETS = GKE_540[1::2]

#: 540B's 6144 chips as two 2x32x48 slices (model 48 along the 48-chip axis): a shape Cloud TPU's queued
#: resources take (sides at most 4 or multiples of 4) but GKE's node pools do not (a side of 2 above 2x4x4).
ODD_540 = ["--set", "infra.hardware.topology=2x32x48", "--set", "infra.mesh.model=48", "--set", "infra.mesh.fsdp=64",
           "--set", "infra.mesh.data=2"]


def _readme_launch(*words: str) -> list[str]:
    """The `palm launch` dry run of infra/README.md that has all these words, as argv after `launch`."""
    found = [c for c in doc_commands() if c.startswith("uv run palm launch ") and all(w in shlex.split(c) for w in words)]
    assert found, words
    return shlex.split(min(found, key=len))[4:]


#: The goldens of the commands infra/README.md gives are made from exactly those commands.
GOLDEN_CASES = {
    "palm-540b-gke": _readme_launch("infra.launcher.kind=gke", "--dry-run"),
    "palm-540b-tpu-vm": _readme_launch("specs/palm-540b.yaml", "--dry-run"),
    "palm-8b-tpu-vm": [str(SPECS / "palm-8b.yaml"), "--dry-run"],
    "palm-540b-eval-gke": [S540, *GKE_540, "--eval-checkpoint", CKPT_540, "--dry-run"],
    "palm-540b-eval-tpu-vm": _readme_launch("--eval-checkpoint", "--dry-run"),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_dry_run_matches_golden(capsys, case, monkeypatch):
    monkeypatch.chdir(ROOT)  # infra/README.md's commands name the specs from the repository's root
    rc, out, err = run_cli(capsys, *GOLDEN_CASES[case])
    assert rc == 0, err
    golden = GOLDEN / f"launch-{case}.txt"
    if os.environ.get("PALM_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(out)
    assert golden.is_file(), f"missing {golden}; create it with PALM_UPDATE_GOLDEN=1 (see this module's doc)"
    assert out == golden.read_text(), (f"`palm launch {' '.join(GOLDEN_CASES[case])}` no longer prints {golden}; "
                                       "if the change is intended, regenerate it with PALM_UPDATE_GOLDEN=1")


def jobset_540b(capsys, *extra: str) -> dict:
    rc, out, err = run_cli(capsys, S540, *GKE_540, "--dry-run", *extra)
    assert rc == 0, err
    return yaml.safe_load(out)  # the commands before the manifest are YAML comments


def test_540b_jobset_is_eight_node_pools_of_768_chips(capsys):
    """infra/README.md's GKE recipe: the 540B run's 6144 chips as 8 node pools of 8x8x12, model 12 along
    the 12-chip axis, FSDP 64 over the rest of a slice, data 8 over the slices."""
    js = jobset_540b(capsys)
    assert (js["apiVersion"], js["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert js["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 3
    [rjob] = js["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    [container] = pod["containers"]
    chips_per_host = container["resources"]["limits"]["google.com/tpu"]
    assert rjob["replicas"] == 8  # slices
    assert job["parallelism"] == job["completions"] == 192  # hosts per slice
    assert chips_per_host == 4
    assert job["parallelism"] * chips_per_host == 768  # chips per slice
    assert rjob["replicas"] * job["parallelism"] == 1536 and rjob["replicas"] * job["parallelism"] * 4 == 6144
    assert job["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    topology = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    assert topology == "8x8x12"  # AxBxC with A <= B <= C, as Cloud TPU writes v4 topologies; one GKE offers
    assert math.prod(int(d) for d in topology.split("x")) == 768
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v4-podslice"

    # The worker gets the mesh: per slice model 12 x fsdp 64 = its 768 chips; data 8 = one per slice.
    command = container["command"]
    assert command[:5] == ["palm", "worker", "specs/palm-540b.yaml", "--output", "gs://palm-runs/palm-540b"]
    sets = dict(command[i + 1].split("=", 1) for i, word in enumerate(command) if word == "--set")
    mesh = {axis: int(sets[f"infra.mesh.{axis}"]) for axis in ("data", "fsdp", "model")}
    assert mesh == {"data": 8, "fsdp": 64, "model": 12}
    assert mesh["model"] * mesh["fsdp"] == job["parallelism"] * chips_per_host
    assert mesh["data"] == rjob["replicas"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "8"
    assert env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['jobset.sigs.k8s.io/job-index']"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "palm-540b-slice-0-0.palm-540b"


def test_540b_on_tpu_vms_asks_for_two_12x16x16_slices_started_by_a_startup_script(capsys, tmp_path):
    import subprocess

    rc, out, err = run_cli(capsys, S540, "--set", "infra.launcher.kind=tpu-vm", "--dry-run", "--json")
    assert rc == 0, err
    plan = json.loads(out)
    [create] = plan["setup"]
    # Any v4 shape by type and topology (accelerator types such as v4-6144 are listed for some shapes only).
    assert "--type=v4" in create["argv"] and "--topology=12x16x16" in create["argv"]
    assert not any(a.startswith("--accelerator-type") for a in create["argv"])
    assert "--node-count=2" in create["argv"] and "--node-prefix=palm-540b" in create["argv"]
    assert "--metadata-from-file=startup-script=palm-540b-startup.sh" in create["argv"]
    assert plan["workers"] == [] and plan["hosts"] == 1536  # no ssh sessions: every VM runs the script
    script = plan["startup_script"]
    assert plan["status_dir"] == "gs://palm-runs/palm-540b/launch/palm-540b"
    assert "palm worker specs/palm-540b.yaml --output gs://palm-runs/palm-540b" in script
    assert "--set infra.mesh.fsdp=256 --set infra.mesh.model=12" in script
    assert "--privileged" in script and "--env=PALM_STOP_FILE=gs://palm-runs/palm-540b/launch/palm-540b/stop" in script
    assert '"$STATUS/$HOST.json"' in script and '"$STATUS/$HOST.log"' in script
    path = tmp_path / "startup.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # it parses
    [delete] = plan["teardown"]
    assert delete["argv"][:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "palm-540b"]
    assert "--force" in delete["argv"]


def test_tpu_containers_on_gke_are_privileged(capsys):
    [container] = jobset_540b(capsys)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"] == {"privileged": True}


@pytest.mark.parametrize("spec, extra", [
    ("palm-540b.yaml", GKE_540),
    ("palm-62b.yaml", ["--set", "infra.launcher.kind=gke"]),
    ("palm-8b.yaml", ["--set", "infra.launcher.kind=gke", "--set", "infra.launcher.namespace=training"]),
    ("palm-540b.yaml", ["--set", "infra.launcher.kind=gke", "--set", "infra.hardware.num_slices=1",
                        "--set", "infra.hardware.num_devices=2048", "--set", "infra.hardware.topology=8x16x16",
                        "--set", "infra.mesh.data=1", "--set", "infra.mesh.fsdp=128", "--set", "infra.mesh.model=16"]),
], ids=["540b", "62b", "8b", "540b-one-slice"])
def test_every_generated_jobset_validates(capsys, spec, extra):
    rc, out, err = run_cli(capsys, str(SPECS / spec), "--dry-run", "--json", *extra)
    assert rc == 0, err
    [manifest] = json.loads(out)["manifests"]
    validate_jobset(manifest)  # our JobSet v1alpha2 schema, and Kubernetes' own for the Job template
    for rjob in manifest["spec"]["replicatedJobs"]:  # the Job template, independently: strict batch/v1 Job
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "check"}, "spec": rjob["template"]["spec"]}
        kubernetes_validate.validate(job, "1.30", strict=True)


@pytest.mark.parametrize("path, value, where", [
    (("spec", "suspended"), True, "spec"),                                   # not a JobSet field
    (("spec", "failurePolicy", "maxRestart"), 3, "spec.failurePolicy"),       # misspelt
    (("metadata", "name"), "Palm_540B", "metadata.name"),                     # not a DNS label
    (("spec", "replicatedJobs", 0, "template", "spec", "template", "spec", "containers", 0, "resource"),
     {"limits": {}}, "spec.replicatedJobs.0.template"),                       # not a Container field (k8s schema)
    (("spec", "replicatedJobs", 0, "template", "spec", "backoffLimit"), "none", "spec.replicatedJobs.0.template"),
])
def test_a_broken_jobset_is_rejected_with_its_path(capsys, path, value, where):
    manifest = jobset_540b(capsys)
    node = manifest
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(PalmError) as info:
        validate_jobset(manifest)
    assert where in str(info.value)


def test_worker_command():
    assert worker_command("specs/palm-8b.yaml", "gs://b/runs/palm-8b", ["train.steps=5"]) == [
        "palm", "worker", "specs/palm-8b.yaml", "--output", "gs://b/runs/palm-8b", "--set", "train.steps=5"]
    assert worker_command("specs/palm-8b.yaml", "gs://b/r", ["infra.mesh.fsdp=8"], eval_checkpoint="gs://b/r/c/40") == [
        "palm", "worker", "specs/palm-8b.yaml", "--output", "gs://b/r", "--eval-checkpoint", "gs://b/r/c/40",
        "--set", "infra.mesh.fsdp=8"]


def test_540b_checkpoints_are_evaluated_by_a_jobset_of_the_same_shape_and_mesh_as_training(capsys):
    """The evaluation job of one 540B checkpoint: the training job's slices, hosts and mesh, named after
    the checkpoint's step (so a re-run finds it), every host evaluating that checkpoint."""
    train, ev = jobset_540b(capsys), jobset_540b(capsys, "--eval-checkpoint", CKPT_540)
    assert ev["metadata"]["name"] == "palm-540b-eval-255000"
    assert ev["metadata"]["labels"]["app.kubernetes.io/component"] == "eval"
    fingerprint = "palm.dev/job-fingerprint"
    assert ev["metadata"]["annotations"][fingerprint] != train["metadata"]["annotations"][fingerprint]
    [rjob], [train_rjob] = ev["spec"]["replicatedJobs"], train["spec"]["replicatedJobs"]
    assert rjob["replicas"] == train_rjob["replicas"] == 8
    job, train_job = rjob["template"]["spec"], train_rjob["template"]["spec"]
    assert job["parallelism"] == train_job["parallelism"] == 192
    pod, train_pod = job["template"]["spec"], train_job["template"]["spec"]
    assert pod["nodeSelector"] == train_pod["nodeSelector"]
    [container], [train_container] = pod["containers"], train_pod["containers"]
    command = container["command"]
    assert command[:7] == ["palm", "worker", "specs/palm-540b.yaml", "--output", "gs://palm-runs/palm-540b",
                           "--eval-checkpoint", CKPT_540]
    mesh = [w for w in command if w.startswith("infra.mesh.")]
    assert mesh == [w for w in train_container["command"] if w.startswith("infra.mesh.")]
    assert mesh[-3:] == ["infra.mesh.data=8", "infra.mesh.fsdp=64", "infra.mesh.model=12"]  # the resolved mesh, last
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "palm-540b-eval-255000-slice-0-0.palm-540b-eval-255000"
    validate_jobset(ev)


def test_540b_checkpoints_on_tpu_vms_are_evaluated_by_their_own_queued_resource(capsys):
    rc, out, err = run_cli(capsys, S540, "--set", "infra.launcher.kind=tpu-vm", "--eval-checkpoint", CKPT_540,
                           "--dry-run", "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["name"] == "palm-540b-eval-255000" and plan["hosts"] == 1536
    assert plan["status_dir"] == "gs://palm-runs/palm-540b/launch/palm-540b-eval-255000"
    [create] = plan["setup"]
    assert "--type=v4" in create["argv"] and "--topology=12x16x16" in create["argv"] and "--node-count=2" in create["argv"]
    assert (f"palm worker specs/palm-540b.yaml --output gs://palm-runs/palm-540b --eval-checkpoint {CKPT_540} "
            "--set infra.launcher.kind=tpu-vm --set infra.mesh.data=2 --set infra.mesh.fsdp=256 "
            "--set infra.mesh.model=12") in plan["startup_script"]


def test_eval_job_names_keep_the_step():
    from palm.jobs.launching import eval_job_name

    spec = load_spec(S540, ["name=a-very-long-spec-name-for-a-very-large-language-model"])
    name = eval_job_name(spec, 1_234_567)
    assert name == "a-very-long-spec-name-for-a-eval-1234567" and len(name) <= 40


@pytest.mark.parametrize("checkpoint", ["gs://palm-runs/palm-540b/train/0123456789abcdef/checkpoints",
                                        "gs://palm-runs/palm-540b/train/0123456789abcdef/checkpoints/latest"])
def test_an_eval_job_needs_a_checkpoint_step(capsys, checkpoint):
    rc, out, err = run_cli(capsys, S540, "--eval-checkpoint", checkpoint, "--dry-run")
    assert rc == 2 and "is not a checkpoint step directory" in err and "Traceback" not in err and out == ""


BROKEN = [
    ("gke-without-image", [S540, *GKE_540, "--set", "infra.launcher.image=null"], "infra.launcher.image"),
    ("tpu-vm-without-runtime", [S540, "--set", "infra.launcher.runtime_version=null"],
     "infra.launcher.runtime_version"),
    ("tpu-vm-without-project", [S540, "--set", "infra.launcher.project=null"],
     "infra.launcher.project"),
    ("devices-not-divisible-by-host", [S540, *GKE_540, "--set", "infra.hardware.devices_per_host=5"],
     "infra.hardware.devices_per_host"),
    ("not-a-v4-host", [S540, *GKE_540, "--set", "infra.hardware.devices_per_host=8"], "infra.hardware.devices_per_host"),
    ("hosts-do-not-match-topology", [S540, *GKE_540, "--set", "infra.hardware.topology=16x16x16"], "infra.hardware.topology"),
    ("topology-out-of-order", [S540, *GKE_540, "--set", "infra.hardware.topology=16x16x12"], "infra.hardware.topology"),
    ("topology-malformed", [S540, *GKE_540, "--set", "infra.hardware.topology=3072"], "infra.hardware.topology"),
    ("no-topology", [S540, *GKE_540, "--set", "infra.hardware.topology=null"], "infra.hardware.topology"),
    ("topology-gke-lacks", [S540, *ODD_540, "--set", "infra.launcher.kind=gke"], "infra.hardware.topology"),
    ("topology-beyond-a-pod", [S540, "--set", "infra.hardware.num_slices=1", "--set", "infra.hardware.topology=16x16x24",
                               "--set", "infra.mesh.data=1", "--set", "infra.mesh.fsdp=256", "--set", "infra.mesh.model=24"],
     "infra.hardware.topology"),
    ("gpu-on-gke", [S540, *GKE_540, "--set", "infra.hardware.accelerator=h100"], "infra.hardware.accelerator"),
    ("cpu-on-gke", [S540, *GKE_540, "--set", "infra.hardware.accelerator=cpu"], "infra.hardware.accelerator"),
    ("local-root-on-gke", [S540, *GKE_540, "--output", "/tmp/runs"], "infra.storage_root"),
    ("processes-on-gke", [S540, *GKE_540, "--set", "infra.launcher.processes=2"], "infra.launcher.processes"),
    ("uneven-local-processes", [str(SPECS / "tiny.yaml"), "--set", "infra.launcher.processes=3",
                                "--set", "infra.hardware.num_devices=2"], "infra.launcher.processes"),
]


@pytest.mark.parametrize("argv, key", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_a_broken_launcher_is_bad_input_naming_the_key(capsys, argv, key):
    rc, out, err = run_cli(capsys, *argv, "--dry-run")
    assert rc == 2, (out, err)
    assert key in err and Path(argv[0]).name in err
    assert err.startswith("palm: error:") and "Traceback" not in err and out == ""


def test_gke_refuses_a_topology_it_lacks_naming_the_shape_it_offers(capsys):
    """2x32x48 is a Cloud TPU shape but not a GKE node-pool one: the gke launcher stops with the same chips
    as GKE offers them, flags to paste; the tpu-vm launcher takes it. PaLM's own 12x16x16 is a GKE shape
    (every side a multiple of 4: palm.base.hardware.gke_v4_problem)."""
    rc, out, err = run_cli(capsys, S540, *ODD_540, "--set", "infra.launcher.kind=gke", "--dry-run")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert "2x32x48 is not a TPU v4 node-pool topology on GKE" in err
    assert "2 slice(s) of 4x12x64 with mesh data=2 x fsdp=64 x model=48" in err
    assert "--set infra.hardware.num_slices=2 --set infra.hardware.topology=4x12x64 --set infra.mesh.data=2" in err
    rc, out, err = run_cli(capsys, S540, *ODD_540, "--dry-run")
    assert rc == 0 and "--type=v4 --topology=2x32x48" in out
    rc, out, err = run_cli(capsys, S540, "--set", "infra.launcher.kind=gke", "--dry-run")
    assert rc == 0 and "cloud.google.com/gke-tpu-topology: 12x16x16" in out, err


def test_palm_plan_flags_a_topology_the_launcher_cannot_get(capsys):
    from palm.cli import main as palm

    assert palm(["plan", S540, *ODD_540, "--set", "infra.launcher.kind=gke"]) == 0
    text = capsys.readouterr().out
    assert "launch          UNSUPPORTED on gke: 2x32x48 is not a TPU v4 node-pool topology on GKE" in text
    assert "2 slice(s) of 4x12x64" in text
    assert palm(["plan", S540, *ODD_540, "--json", "--set", "infra.launcher.kind=gke"]) == 0
    launch = json.loads(capsys.readouterr().out)["launch"]
    assert launch["alternatives"][0] == {"topology": "4x12x64", "num_slices": 2, "usable": True,
                                         "mesh": {"data": 2, "fsdp": 64, "model": 48}}
    assert palm(["plan", S540, "--set", "infra.launcher.kind=gke"]) == 0
    assert "launch          gke: 2 slice(s) of 12x16x16, a shape it offers" in capsys.readouterr().out
    assert palm(["plan", S540]) == 0
    assert "launch          tpu-vm: 2 slice(s) of 12x16x16, a shape it offers" in capsys.readouterr().out
    assert palm(["plan", S540, *GKE_540]) == 0
    assert "launch          gke: 8 slice(s) of 8x8x12, a shape it offers" in capsys.readouterr().out


def test_a_spec_outside_the_repository_cannot_reach_remote_workers(capsys, tmp_path):
    spec = tmp_path / "mine.yaml"
    spec.write_text(f"extends: {SPECS / 'palm-540b.yaml'}\nname: mine\n")
    rc, out, err = run_cli(capsys, str(spec), "--dry-run")
    assert rc == 2 and "image" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- fakes

FAKE = r'''
import json, os, signal, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOL = Path(sys.argv[0]).name
ARGS = sys.argv[1:]
SCENARIO = json.loads((HERE / "scenario.json").read_text()).get(TOOL, {})
STATE = HERE / "state.json"


def record(stdin=None):
    entry = {"tool": TOOL, "argv": ARGS, "stdin": stdin,
             "env": {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_FLAGS"))}}
    fd = os.open(HERE / "calls.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:  # one append per call: concurrent fakes never interleave their lines
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def state():
    return json.loads(STATE.read_text()) if STATE.exists() else {}


def save(s):  # atomically: a `logs` follower reads the state while a `get` poll writes it
    partial = STATE.with_name(f"state.{os.getpid()}.json")
    partial.write_text(json.dumps(s))
    os.replace(partial, STATE)


def upload(target, text):
    if target.startswith("gs://"):
        import urllib.parse, urllib.request
        bucket, _, name = target[5:].partition("/")
        url = (os.environ["STORAGE_EMULATOR_HOST"].rstrip("/") + f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
               + urllib.parse.quote(name, safe=""))
        if not url.startswith("http"):
            url = "http://" + url
        urllib.request.urlopen(urllib.request.Request(url, data=text.encode(), method="POST",
                                                      headers={"Content-Type": "application/octet-stream"}))
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text)


def running(s, attempt):
    """The leader's container runs until the poll before the JobSet's outcome."""
    return s.get("polls", 0) < attempt.get("polls", 2)


def kubectl():
    if ARGS[:2] == ["create", "-f"]:
        manifest = sys.stdin.read()
        record(manifest)
        s = state()
        s["attempt"] = s.get("attempt", 0) + 1
        s["polls"] = 0
        s["annotations"] = __import__("yaml").safe_load(manifest)["metadata"].get("annotations", {})
        s.pop("deleted", None)
        save(s)
        return 0
    record()
    s = state()
    if ARGS[:2] == ["get", "jobset"] and ("attempt" not in s or s.get("deleted")):
        existing = SCENARIO.get("existing")
        if existing is None or s.get("deleted"):
            print(f'Error from server (NotFound): jobsets.jobset.x-k8s.io "{ARGS[2]}" not found', file=sys.stderr)
            return 1
        annotations = {"palm.dev/job-fingerprint": existing.get("fingerprint") or s.get("our_fingerprint", "")}
        print(json.dumps({"kind": "JobSet", "metadata": {"name": ARGS[2], "annotations": annotations},
                          "status": existing.get("status", {})}))
        if existing.get("becomes_ours"):  # a running JobSet of this job: following it goes on below
            s["attempt"], s["polls"], s["annotations"] = 1, 0, annotations
            save(s)
        return 0
    attempt = SCENARIO["attempts"][s.get("attempt", 1) - 1]
    if ARGS[:2] == ["get", "jobset"]:
        s["polls"] = s.get("polls", 0) + 1
        save(s)
        status = {"restarts": attempt.get("restarts", 0) if s["polls"] > 1 else 0}
        if s["polls"] > attempt.get("polls", 2):
            outcome = attempt["outcome"]
            if outcome == "Completed":
                status["conditions"] = [{"type": "Completed", "status": "True", "reason": "AllJobsCompleted",
                                         "message": "jobset completed successfully"}]
                if SCENARIO.get("manifest_to") and not s.get(f"wrote{s['attempt']}"):
                    upload(SCENARIO["manifest_to"], json.dumps(SCENARIO["manifest"]))
                    s[f"wrote{s['attempt']}"] = True
                    save(s)
            else:
                status["conditions"] = [{"type": "Failed", "status": "True", "reason": outcome,
                                         "message": attempt.get("message", outcome)}]
        print(json.dumps({"kind": "JobSet", "metadata": {"name": ARGS[2], "annotations": s.get("annotations", {})},
                          "status": status}))
        return 0
    if ARGS[:2] == ["get", "pods"]:
        n = s.get("attempt", 1)
        phase = "Running" if running(s, attempt) else "Succeeded" if attempt["outcome"] == "Completed" else "Failed"
        print(json.dumps({"items": [{"metadata": {"name": f"leader-{n}", "creationTimestamp": f"2030-01-01T00:00:0{n}Z"},
                                     "status": {"phase": phase}}]}))
        return 0
    if ARGS[0] == "logs":  # line i of the log at second i // 2 (two lines a second), as the kubelet stamps them
        since = next((a.split("=", 1)[1] for a in ARGS if a.startswith("--since-time=")), None)
        follows = sum(1 for c in map(json.loads, (HERE / "calls.jsonl").read_text().splitlines())
                      if c["tool"] == "kubectl" and c["argv"][0] == "logs" and c["argv"][-1] == ARGS[-1])
        tail = next((int(a.split("=", 1)[1]) for a in ARGS if a.startswith("--tail=")), None)
        for i, line in enumerate(attempt.get("log", [])):
            if tail is not None and i < len(attempt["log"]) - tail:
                continue
            stamp = f"2030-01-01T00:00:{i // 2:02d}" + (".5" if i % 2 else "") + "Z"
            if since is not None and stamp[:19] < since[:19]:  # the API server takes the time to the second
                continue
            if follows <= len(attempt.get("cuts", [])) and i == attempt["cuts"][follows - 1]:
                print("error: unexpected EOF", file=sys.stderr)  # the stream dropped
                return 1
            print(f"{stamp} {line}" if "--timestamps" in ARGS else line, flush=True)
        n, deadline = s.get("attempt", 1), time.monotonic() + 60
        while "--follow" in ARGS and running(s, attempt) and time.monotonic() < deadline:
            time.sleep(0.01)  # a follow ends when the leader's container does
            s = state()
            if s.get("attempt", 1) != n:
                break
        return 0
    if ARGS[0] == "delete":
        s["deleted"] = True
        save(s)
        return 0
    print(f"fake kubectl: unexpected {ARGS}", file=sys.stderr)
    return 3


def gcloud():
    record()
    s = state()
    if "create" in ARGS:
        s["describes"], s["created"] = 0, True
        save(s)
        return SCENARIO.get("create_exit", 0)
    if "describe" in ARGS:
        if not s.get("created"):
            existing = SCENARIO.get("existing")
            if existing is None:
                print("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: queued resource not found",
                      file=sys.stderr)
                return 1
            print(existing)
            if existing in ("ACTIVE", "PROVISIONING") and SCENARIO.get("existing_is_ours"):
                s["created"], s["describes"] = True, 0
                save(s)
            return 0
        states = SCENARIO["states"]
        s["describes"] = s.get("describes", 0) + 1
        save(s)
        current = states[min(s["describes"], len(states)) - 1]
        print(current)
        if current == "ACTIVE" and not s.get("reported"):  # the VMs run the startup script
            status_dir = SCENARIO["status_dir"]
            for i, host in enumerate(SCENARIO["hosts"]):
                upload(f"{status_dir}/{host}.log", "\n".join(f"{host}: {line}" for line in SCENARIO.get("log", [])) + "\n")
                code = SCENARIO.get("exit", {}).get(host, 0)
                if code is not None:
                    upload(f"{status_dir}/{host}.json", json.dumps({"host": host, "exit_code": code}))
            s["reported"] = True
            save(s)
        return 0
    if "delete" in ARGS:
        s["created"] = False
        save(s)
        return 0
    return 3


def palm():
    record()
    index = os.environ["JAX_PROCESS_ID"]
    signal.signal(signal.SIGTERM, lambda *_: (print(f"worker {index}: checkpointed, stopping", flush=True),
                                              os._exit(75)))
    print(f"worker {index} of {os.environ['JAX_NUM_PROCESSES']} at {os.environ['JAX_COORDINATOR_ADDRESS']}", flush=True)
    deadline = time.time() + SCENARIO.get("sleep", {}).get(index, 0)
    while time.time() < deadline:
        time.sleep(0.01)
    return SCENARIO.get("exit", {}).get(index, 0)


sys.exit({"kubectl": kubectl, "gcloud": gcloud, "palm": palm}[TOOL]())
'''


class Fakes:
    """Fake gcloud, kubectl and palm on PATH, playing `scenario`; `calls()` is what they were run with."""

    def __init__(self, tmp_path: Path, monkeypatch, scenario: dict):
        self.dir = tmp_path / "fakebin"
        self.dir.mkdir()
        (self.dir / "scenario.json").write_text(json.dumps(scenario))
        source = f"#!{sys.executable}\n" + textwrap.dedent(FAKE)
        for tool in ("gcloud", "kubectl", "palm"):
            path = self.dir / tool
            path.write_text(source)
            path.chmod(0o755)
        monkeypatch.setenv("PATH", f"{self.dir}{os.pathsep}{os.environ['PATH']}")

    def calls(self, tool: str | None = None) -> list[dict]:
        path = self.dir / "calls.jsonl"
        entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [e for e in entries if tool is None or e["tool"] == tool]


# ------------------------------------------------------------------------------------------- gke


def kubectl_verbs(fakes: Fakes) -> list[str]:
    return [" ".join(c["argv"][:2]) for c in fakes.calls("kubectl")]


def test_gke_launch_runs_the_jobset_follows_the_leader_and_streams_its_log(capsys, tmp_path, monkeypatch):
    fakes = Fakes(tmp_path, monkeypatch, {"kubectl": {"attempts": [
        {"outcome": "Completed", "polls": 2, "log": ["step 1/255000 loss 12.5", "step 255000/255000 loss 1.9"]}]}})
    expected = jobset_540b(capsys, *FAST)
    rc, out, err = run_cli(capsys, S540, *GKE_540, *FAST)
    assert rc == 0, err
    assert out.strip() == "palm-540b: completed (gke)"
    calls = fakes.calls("kubectl")
    assert calls[0]["argv"] == ["get", "jobset", "palm-540b", "--namespace=palm", "--output=json"]  # none yet
    assert calls[1]["argv"] == ["create", "-f", "-"]
    assert yaml.safe_load(calls[1]["stdin"]) == expected  # exactly the manifest the dry run printed
    assert ["get", "jobset", "palm-540b", "--namespace=palm", "--output=json"] in [c["argv"] for c in calls]
    logs = [c["argv"] for c in calls if c["argv"][0] == "logs"]
    assert logs == [["logs", "--namespace=palm", "--container=worker", "--follow", "--timestamps", "leader-1"]]
    assert "step 1/255000 loss 12.5" in err and "step 255000/255000 loss 1.9" in err  # streamed to stderr
    assert kubectl_verbs(fakes).count("get jobset") == 4  # none yet; twice running, then completed: it stopped there


def test_a_log_stream_cut_while_the_leader_runs_is_followed_again_and_no_line_is_lost_or_repeated(
        capsys, tmp_path, monkeypatch):
    """The API server drops `kubectl logs --follow` twice: each new follow starts from the last line's time
    (which the server takes to the second, so it repeats lines) and every line reaches the log once."""
    lines = [f"step {i} loss {10 - i}.0" for i in range(10)]
    fakes = Fakes(tmp_path, monkeypatch, {"kubectl": {"attempts": [
        {"outcome": "Completed", "polls": 6, "log": lines, "cuts": [3, 7]}]}})
    rc, out, err = run_cli(capsys, S540, *GKE_540, *FAST)
    assert rc == 0, err
    assert rc == 0, err
    assert err.count("error: unexpected EOF") == 2  # kubectl's own word on each cut reaches the user
    follow = ["logs", "--namespace=palm", "--container=worker", "--follow", "--timestamps"]
    assert [c["argv"] for c in fakes.calls("kubectl") if c["argv"][0] == "logs"] == [
        [*follow, "leader-1"],
        [*follow, "--since-time=2030-01-01T00:00:01Z", "leader-1"],  # line 2's time: lines 0-2 were logged
        [*follow, "--since-time=2030-01-01T00:00:03Z", "leader-1"]]  # line 6's


def test_a_log_that_cannot_be_read_is_tried_again_with_a_doubling_wait(tmp_path, monkeypatch):
    fakes = Fakes(tmp_path, monkeypatch, {"kubectl": {"attempts": [
        {"outcome": "Completed", "polls": 0, "log": ["step 1 loss 3.0"], "cuts": [0] * 4}]}})
    now, logged = [0.0], []
    leader_log = LeaderLog(kubectl_commands("palm-540b", "palm")["logs"], logged.append, poll_seconds=10,
                           clock=lambda: now[0])

    def poll_at(t: float) -> int:
        """A poll at time t that finds the leader running; how many follows were started by then."""
        now[0] = t
        leader_log.update(("leader-1", "Running"))
        while leader_log.following():
            time.sleep(0.01)
        return len([c for c in fakes.calls("kubectl") if c["argv"][0] == "logs"])

    # Each follow fails at once: the next waits one poll interval, then two, then four.
    assert [poll_at(t) for t in (0, 0, 9, 10, 10, 29, 30, 30, 69, 70)] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert poll_at(70) == 4 and poll_at(70 + 80) == 5  # the fifth follow reads the log
    leader_log.drain()
    assert logged.count("error: unexpected EOF") == 4 and logged[-1] == "step 1 loss 3.0"


def test_a_rerun_reattaches_to_its_running_jobset_instead_of_restarting_it(capsys, tmp_path, monkeypatch):
    """The Prefect worker's VM restarted while the job ran: a re-run finds the JobSet of this very job
    (its fingerprint annotation) still running and follows it; nothing is deleted or created."""
    fingerprint = jobset_540b(capsys, *FAST)["metadata"]["annotations"]["palm.dev/job-fingerprint"]
    log = [f"step {step}/255000 loss 2.0" for step in range(199850, 200001)]  # weeks of it, logged before
    fakes = Fakes(tmp_path, monkeypatch, {"kubectl": {
        "existing": {"fingerprint": fingerprint, "becomes_ours": True},
        "attempts": [{"outcome": "Completed", "polls": 2, "log": log}]}})
    rc, out, err = run_cli(capsys, S540, *GKE_540, *FAST)
    assert rc == 0, err
    assert "re-attaching to this job's JobSet (running)" in err and "step 200000/255000 loss 2.0" in err
    assert "step 199900/" not in err and err.count("/255000 loss 2.0") == 100  # its last 100 lines, then on
    assert [c["argv"][-2:] for c in fakes.calls("kubectl") if c["argv"][0] == "logs"] == [["--tail=100", "leader-1"]]
    assert "create -f" not in kubectl_verbs(fakes) and not any(v.startswith("delete") for v in kubectl_verbs(fakes))


def test_a_running_jobset_of_another_job_is_refused_and_force_replaces_it(capsys, tmp_path, monkeypatch):
    fakes = Fakes(tmp_path, monkeypatch, {"kubectl": {"existing": {"fingerprint": "0123456789abcdef"},
                                                      "attempts": [{"outcome": "Completed", "polls": 1}]}})
    rc, out, err = run_cli(capsys, S540, *GKE_540, *FAST)
    assert rc == 2 and "of another job is running" in err and "--force" in err
    assert kubectl_verbs(fakes) == ["get jobset"]
    # A forced stage replaces it: delete, then create.
    spec = load_spec(S540, [*GKE_SETS, "infra.launcher.poll_seconds=0.01"])
    launch(plan_launch(spec, S540, "gs://palm-runs/palm-540b"), log=lambda line: None, replace=True)
    assert kubectl_verbs(fakes)[1:4] == ["get jobset", "delete jobset", "create -f"]


@pytest.mark.parametrize("reason, rc, exception", [
    ("ReachedMaxRestarts", 75, JobPreempted),
    ("FailedJobs", 1, JobFailed),
    ("FailJobSetFailurePolicyAction", 2, WorkerRejected),
], ids=["preempted", "failed", "bad-input"])
def test_gke_outcomes(capsys, tmp_path, monkeypatch, reason, rc, exception):
    fakes = Fakes(tmp_path, monkeypatch, {"kubectl": {"attempts": [
        {"outcome": reason, "polls": 2, "restarts": 3, "message": "jobset failed", "log": ["step 7 loss 3.0"]}]}})
    code, out, err = run_cli(capsys, S540, *GKE_540, *FAST)
    assert code == rc and out == ""
    assert "step 7 loss 3.0" in err and "Traceback" not in err
    if reason == "ReachedMaxRestarts":
        assert "restarted every slice (3 of at most 3 restarts)" in err
    # The same through the API: the exception the train task's retry policy sees.
    (fakes.dir / "state.json").unlink()
    spec = load_spec(S540, [*GKE_SETS, "infra.launcher.poll_seconds=0.01"])
    with pytest.raises(exception):
        launch(plan_launch(spec, S540, "gs://palm-runs/palm-540b"), log=lambda line: None)
    assert kubectl_verbs(fakes).count("create -f") == 2


# ----------------------------------------------------------------------------------------- tpu-vm
# The tiny model on two TPU v4 slices of one 4-chip host each: two startup scripts' worth of statuses.

TPU_VM = [S540, "--set", "infra.launcher.kind=tpu-vm", *FAST]
HOSTS = ["t1v-n-a-w-0", "t1v-n-b-w-0"]
WORKERS_SA = "palm-tpu@p.iam.gserviceaccount.com"


def small_tpu_vm(root: str) -> list[str]:
    return [str(SPECS / "tiny.yaml"), "--output", root, *FAST, *[a for item in [
        "infra.launcher.kind=tpu-vm", "infra.launcher.project=p", "infra.launcher.zone=us-central2-b",
        "infra.launcher.runtime_version=tpu-ubuntu2204-base", "infra.launcher.image=example/palm:1",
        "infra.hardware.accelerator=tpu-v4", "infra.hardware.num_devices=8", "infra.hardware.num_slices=2",
        "infra.hardware.devices_per_host=4", "infra.hardware.topology=1x2x2", "infra.mesh.data=2",
        "infra.mesh.fsdp=4", f"infra.identities.workers={WORKERS_SA}"] for a in ("--set", item)]]


@pytest.fixture
def tpu_vm_root(gcs_emulator) -> str:
    import uuid

    return f"gs://bucket/tpu-vm-{uuid.uuid4().hex[:8]}/tiny"


def tpu_vm_scenario(root: str, **extra) -> dict:
    return {"gcloud": {"status_dir": f"{root}/launch/tiny", "hosts": HOSTS, **extra}}


def test_tpu_vm_launch_creates_follows_the_hosts_statuses_and_deletes(capsys, tmp_path, monkeypatch, tpu_vm_root):
    fakes = Fakes(tmp_path, monkeypatch, tpu_vm_scenario(tpu_vm_root, states=[
        "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], log=["step 10/180 loss 9.1"]))
    rc, out, err = run_cli(capsys, *small_tpu_vm(tpu_vm_root))
    assert rc == 0, err
    dry = json.loads(run_cli(capsys, *small_tpu_vm(tpu_vm_root), "--dry-run", "--json")[1])
    calls = [c["argv"] for c in fakes.calls("gcloud")]
    creates = [c for c in calls if "create" in c]
    assert "describe" in calls[0]  # is there one already? (no: NOT_FOUND)
    assert len(creates) == 1 and ["gcloud", *creates[0]] == dry["setup"][0]["argv"]
    assert f"--service-account={WORKERS_SA}" in creates[0]  # never the Compute Engine default account
    assert not any("ssh" in c for c in calls)
    assert ["gcloud", *calls[-1]] == dry["teardown"][0]["argv"]
    assert f"[{HOSTS[0]}] {HOSTS[0]}: step 10/180 loss 9.1" in err  # the first host's log, from the run root
    assert "WAITING_FOR_RESOURCES" in err and "ACTIVE" in err
    from palm.base import storage

    assert json.loads(storage.read_text(f"{tpu_vm_root}/launch/tiny/job.json"))["fingerprint"] == dry["fingerprint"]


@pytest.mark.parametrize("scenario, rc, exception", [
    ({"states": ["ACTIVE"], "exit": {HOSTS[1]: 75}}, 75, JobPreempted),
    ({"states": ["ACTIVE", "SUSPENDED"], "exit": {HOSTS[0]: None, HOSTS[1]: None}}, 75, JobPreempted),
    ({"states": ["ACTIVE"], "exit": {HOSTS[0]: 1, HOSTS[1]: None}}, 1, JobFailed),
    ({"states": ["ACTIVE"], "exit": {HOSTS[0]: 2}}, 2, WorkerRejected),
    ({"states": ["WAITING_FOR_RESOURCES", "FAILED"]}, 1, JobFailed),
], ids=["worker-preempted", "tpus-suspended", "worker-crashed", "bad-input", "no-capacity"])
def test_tpu_vm_outcomes_always_delete_the_tpus(capsys, tmp_path, monkeypatch, tpu_vm_root, scenario, rc, exception):
    fakes = Fakes(tmp_path, monkeypatch, tpu_vm_scenario(tpu_vm_root, **scenario))
    started = time.monotonic()
    code, out, err = run_cli(capsys, *small_tpu_vm(tpu_vm_root))
    assert code == rc, err
    assert time.monotonic() - started < 20  # a failed host ends the job; nobody waits for the others
    assert "delete" in fakes.calls("gcloud")[-1]["argv"] and "Traceback" not in err
    spec = load_spec(small_tpu_vm(tpu_vm_root)[0], [a for a in small_tpu_vm(tpu_vm_root)[3:] if a != "--set"]
                     + ["infra.launcher.poll_seconds=0.01"])
    (fakes.dir / "state.json").unlink()
    with pytest.raises(exception):
        launch(plan_launch(spec, TINY, tpu_vm_root), log=lambda line: None)


def test_a_rerun_reattaches_to_its_running_tpus_instead_of_starting_again(capsys, tmp_path, monkeypatch, tpu_vm_root):
    """The launcher's machine restarted mid-run: the queued resource is still ACTIVE with this job's
    startup script, so the re-run follows it (no create, no delete before it)."""
    from palm.base import storage

    dry = json.loads(run_cli(capsys, *small_tpu_vm(tpu_vm_root), "--dry-run", "--json")[1])
    storage.write_text_atomic(f"{tpu_vm_root}/launch/tiny/job.json",
                              json.dumps({"name": "tiny", "fingerprint": dry["fingerprint"]}))
    log = [f"step {step}/180 loss 4.0" for step in range(1, 151)]
    fakes = Fakes(tmp_path, monkeypatch, tpu_vm_scenario(tpu_vm_root, existing="ACTIVE", existing_is_ours=True,
                                                         states=["ACTIVE"], log=log))
    rc, out, err = run_cli(capsys, *small_tpu_vm(tpu_vm_root))
    assert rc == 0, err
    calls = [c["argv"] for c in fakes.calls("gcloud")]
    assert not any("create" in c for c in calls) and "re-attaching to this job's queued resource" in err
    assert "delete" in calls[-1]  # at the end, as always
    # The first host's log: its last 100 lines (an earlier launcher logged the rest), then what follows.
    assert err.count("/180 loss 4.0") == 100 and "step 50/180 " not in err and "step 51/180 " in err


def test_a_host_log_that_starts_again_is_followed_from_its_start(tmp_path):
    (tmp_path / "host-0.log").write_text("step 1\nstep 2\nstep 3\n")
    logged: list[str] = []
    follow = _LogFollower(SimpleNamespace(status_dir=str(tmp_path)), logged.append)
    follow()
    follow()  # nothing new
    (tmp_path / "host-0.log").write_text("booted again\nstep 3\n")  # the VM rebooted: a new log
    follow()
    assert logged == ["[host-0] step 1", "[host-0] step 2", "[host-0] step 3",
                      "[host-0] (its log started again: the host restarted its worker)",
                      "[host-0] booted again", "[host-0] step 3"]


def test_tpus_of_another_job_are_never_taken_over(capsys, tmp_path, monkeypatch, tpu_vm_root):
    fakes = Fakes(tmp_path, monkeypatch, tpu_vm_scenario(tpu_vm_root, existing="ACTIVE", states=["ACTIVE"]))
    rc, out, err = run_cli(capsys, *small_tpu_vm(tpu_vm_root))
    assert rc == 2 and "exists (ACTIVE) for another job" in err and "--force" in err
    assert [c["argv"] for c in fakes.calls("gcloud") if "delete" in c["argv"] or "create" in c["argv"]] == []


def test_a_stop_asks_tpu_vm_workers_to_checkpoint_through_the_run_root(tmp_path, monkeypatch, tpu_vm_root):
    from palm.base import storage

    Fakes(tmp_path, monkeypatch, tpu_vm_scenario(tpu_vm_root, states=["ACTIVE"], exit={h: None for h in HOSTS}))
    spec = load_spec(TINY, [a for a in small_tpu_vm(tpu_vm_root)[3:] if a != "--set"])
    plan = plan_launch(spec, TINY, tpu_vm_root)
    stop, lines = threading.Event(), []
    thread = threading.Thread(target=lambda: lines.append(_launch(plan, stop, lines)))
    thread.start()
    deadline = time.time() + 30
    while not any("ACTIVE" in str(line) for line in lines) and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    while not storage.exists(f"{tpu_vm_root}/launch/tiny/stop") and time.time() < deadline:
        time.sleep(0.05)
    assert storage.exists(f"{tpu_vm_root}/launch/tiny/stop")  # what the workers watch (PALM_STOP_FILE)
    for host in HOSTS:  # they checkpoint and exit 75
        storage.write_text_atomic(f"{tpu_vm_root}/launch/tiny/{host}.json", json.dumps({"exit_code": 75}))
    thread.join(30)
    assert isinstance(lines[-1], JobStopped), lines[-3:]


def test_a_worker_stops_when_its_stop_file_appears(tmp_path, monkeypatch):
    from palm.app.worker import _watch_stop_file

    monkeypatch.setenv("PALM_STOP_POLL_SECONDS", "0.05")
    stop = threading.Event()
    done = _watch_stop_file(str(tmp_path / "stop"), stop)
    assert not stop.wait(0.3)
    (tmp_path / "stop").write_text("stop")
    assert stop.wait(5)
    done.set()


def test_missing_gcloud_is_bad_input(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    rc, out, err = run_cli(capsys, *TPU_VM)
    assert rc == 2 and "gcloud: command not found" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ local

TINY = str(SPECS / "tiny.yaml")
LOCAL = [TINY, "--set", "infra.launcher.processes=2", "--set", "infra.hardware.num_devices=4",
         "--set", "infra.launcher.coordinator_port=45123"]


def test_local_dry_run(capsys):
    rc, out, err = run_cli(capsys, *LOCAL, "--output", "/data/runs/tiny", "--dry-run")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("# local: 2 worker process(es)")
    for i, line in enumerate(lines[1:]):
        assert line.startswith(f"JAX_COORDINATOR_ADDRESS=127.0.0.1:45123 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} "
                               "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 palm worker ")
        assert f" {TINY} --output /data/runs/tiny " in line
        assert line.endswith("--set infra.mesh.data=1 --set infra.mesh.fsdp=4 --set infra.mesh.model=1")
    assert len(lines) == 3


def test_local_launch_runs_every_process_and_waits(capsys, tmp_path, monkeypatch):
    fakes = Fakes(tmp_path, monkeypatch, {"palm": {"sleep": {"0": 0.3}}})
    rc, out, err = run_cli(capsys, *LOCAL, "--output", str(tmp_path / "run"))
    assert rc == 0, err
    calls = fakes.calls("palm")
    assert sorted(c["env"]["JAX_PROCESS_ID"] for c in calls) == ["0", "1"]
    assert {c["env"]["JAX_COORDINATOR_ADDRESS"] for c in calls} == {"127.0.0.1:45123"}
    assert all(c["env"]["JAX_NUM_PROCESSES"] == "2" for c in calls)
    assert all(c["argv"][:4] == ["worker", TINY, "--output", str(tmp_path / "run")] for c in calls)
    assert "[worker 0] worker 0 of 2 at 127.0.0.1:45123" in err and "[worker 1] worker 1 of 2" in err


def test_a_preempted_local_worker_stops_the_others(capsys, tmp_path, monkeypatch):
    Fakes(tmp_path, monkeypatch, {"palm": {"exit": {"1": 75}, "sleep": {"0": 30}}})
    started = time.monotonic()
    rc, out, err = run_cli(capsys, *LOCAL, "--output", str(tmp_path / "run"))
    assert rc == 75, err
    assert "[worker 0] worker 0: checkpointed, stopping" in err  # SIGTERM, not 30 s of waiting
    assert time.monotonic() - started < 20


def test_stop_asks_every_worker_to_checkpoint_and_stop(tmp_path, monkeypatch):
    fakes = Fakes(tmp_path, monkeypatch, {"palm": {"sleep": {"0": 30, "1": 30}}})
    spec = load_spec(TINY, ["infra.launcher.processes=2", "infra.hardware.num_devices=2"])
    plan = plan_launch(spec, TINY, str(tmp_path / "run"))
    stop, lines, result = threading.Event(), [], []
    thread = threading.Thread(target=lambda: result.append(_launch(plan, stop, lines)))
    thread.start()
    for _ in range(1000):
        if len(fakes.calls("palm")) == 2:
            break
        time.sleep(0.01)
    time.sleep(0.3)  # both have installed their SIGTERM handler
    stop.set()
    thread.join(20)
    assert result and isinstance(result[0], JobStopped)
    assert sum("checkpointed, stopping" in line for line in lines) == 2


def _launch(plan, stop, lines):
    try:
        launch(plan, stop=stop, log=lines.append)
    except BaseException as e:  # noqa: BLE001 - the test inspects it
        return e
    return None


# ---------------------------------------------------------------------------- the train task on gke


@pytest.mark.slow
def test_train_task_launches_on_gke_and_prefect_retries_a_preempted_job(prefect_server, gcs_emulator, tmp_path,
                                                                        monkeypatch):
    from prefect import flow

    from palm.jobs.launch import train_output
    from palm.store.outputs import StageOutput, read_manifest
    from palm.dag.workflow import resolve_workflow
    from tasks.stage import node_task

    root = "gs://bucket/launch-test"
    spec = load_spec(TINY, ["infra.hardware.accelerator=tpu-v4", "infra.hardware.num_devices=8",
                            "infra.hardware.devices_per_host=4", "infra.hardware.topology=2x2x2",
                            "infra.launcher.kind=gke", "infra.launcher.image=example/palm:1",
                            "infra.launcher.namespace=palm", "infra.launcher.poll_seconds=0.01",
                            "infra.identities.workers=palm-tpu@p.iam.gserviceaccount.com", "retries.train.retries=1", "retries.train.delay_seconds=0"])
    pack = StageOutput("pack", "0123456789abcdef", f"{root}/pack/0123456789abcdef", {"complete": True}, cached=True)
    node = resolve_workflow(spec).nodes["train"]
    key, path = train_output(node, root, {"pack": pack})
    manifest = {"stage": "train", "key": key, "complete": True, "final_step": 180, "final_loss": 3.8,
                "checkpoint": f"{path}/checkpoints/180", "seconds": 12.0, "code_version": "test"}
    fakes = Fakes(tmp_path, monkeypatch, {"kubectl": {
        "manifest_to": f"{path}/manifest.json", "manifest": manifest,
        "attempts": [{"outcome": "ReachedMaxRestarts", "polls": 2, "restarts": 3, "log": ["step 50/180 loss 4.2"]},
                     {"outcome": "Completed", "polls": 2, "log": ["step 180/180 loss 3.8"]}]}})

    @flow(name="train-on-gke")
    def train_on_gke():
        return node_task(node)(node, root, {"pack": pack})

    out = train_on_gke()
    assert (out.stage, out.key, out.path, out.cached) == ("train", key, path, False)
    assert out.manifest == manifest == read_manifest(path)
    assert kubectl_verbs(fakes).count("create -f") == 2  # the preempted attempt, then Prefect's retry
    created = yaml.safe_load(fakes.calls("kubectl")[1]["stdin"])
    command = created["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["command"]
    # The workers load the resolved spec this flow validated, recorded beside the run.
    assert command[:5] == ["palm", "worker", f"{root}/spec.json", "--output", root]
    from palm.base import storage

    assert json.loads(storage.read_text(f"{root}/spec.json")) == spec.model_dump(mode="json")

    # Run again: the output is complete, so nothing is launched.
    calls = len(fakes.calls())
    again = train_on_gke()
    assert again.cached and again.manifest == manifest and len(fakes.calls()) == calls
