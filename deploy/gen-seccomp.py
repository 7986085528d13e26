#!/usr/bin/env python3
"""Build deploy/docker-seccomp.json: Docker's default seccomp profile plus what mcpbox needs to
build `full` sandboxes inside a container, and print that delta.

Usage:
    deploy/gen-seccomp.py [--base DOCKER_DEFAULT_JSON] [--out PATH] [--check]

--base   Docker's default profile (moby/profiles seccomp/default.json). Defaults to the copy kept
         beside this script, deploy/docker-default-seccomp.json (Apache-2.0, the moby project:
         see deploy/docker-default-seccomp.NOTICE).
--out    Where to write (default: deploy/docker-seccomp.json next to this script).
--check  Write nothing; exit 1 if --out differs from what would be generated.

Every rule this script adds carries a comment starting with "mcpbox:", so the delta can also be
read straight from the generated file.

Why each addition (the default profile already allows landlock_*, seccomp, prctl, setresuid,
setgroups, capset, close_range; it gates the calls below on CAP_SYS_ADMIN, which a default
container does not have, so mcpbox must get them without that capability: it creates a user
namespace first and holds capabilities only inside it):
- unshare: sandbox-init creates the user, pid, mount, net, ipc, uts and cgroup namespaces with
  unshare(2) and then forks. Only namespace flags (plus CLONE_FS/FILES/SYSVSEM, which unshare
  also accepts) pass; anything else keeps failing with EPERM.
- mount, umount2: the tmpfs root, read-only binds, a fresh /proc, /dev nodes, the private /tmp;
  the old root is detached with umount2(MNT_DETACH).
- mount_setattr: read-only, nosuid, nodev and noexec are set on the binds (recursively, without
  restating locked flags as a remount would) with mount_setattr(2).
- open_tree, move_mount: each grant is opened once without following symlinks and bound from that
  handle (open_tree(OPEN_TREE_CLONE) + move_mount), never by path.
- setns, CLONE_NEWNET only: the network namespace is made by a helper process while the mount
  view is built; the sandbox's PID 1 and the server join it with setns(fd, CLONE_NEWNET).
- pivot_root: switch to the new root (the default profile does not list it at all).
- sethostname: a fixed hostname inside the new UTS namespace.
Not added, on purpose:
- clone/clone3 with CLONE_NEW* flags: mcpbox uses unshare + a plain fork, which the default
  profile already allows (clone3 keeps answering ENOSYS so libc falls back to clone).
- setns with any other namespace type: mcpbox joins only the network namespace it made.
- fsopen, fsconfig, fsmount: only the disk limit's ext4 image uses them, and only as host root
  with loop devices, which a default container has neither of (the limit is then refused or,
  where the policy relaxes it, not enforced and said so).

The test `sandbox::docker_full_profile_lets_the_full_level_start` loads the generated profile as
a seccomp filter around `mcpbox doctor` and `mcpbox run` and checks that they reach `full`.
"""

import argparse
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_BASE = os.path.join(HERE, "docker-default-seccomp.json")
DEFAULT_OUT = os.path.join(HERE, "docker-seccomp.json")

CLONE_FS = 0x00000200
CLONE_FILES = 0x00000400
CLONE_NEWNS = 0x00020000
CLONE_SYSVSEM = 0x00040000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

UNSHARE_ALLOWED = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
    | CLONE_NEWNET | CLONE_FS | CLONE_FILES | CLONE_SYSVSEM
)
# SCMP_CMP_MASKED_EQ in Docker's format: (arg & value) == valueTwo. Only the low 32 bits are
# looked at (unshare takes an int).
UNSHARE_FORBIDDEN_MASK = 0xFFFFFFFF & ~UNSHARE_ALLOWED

ADDITIONS = [
    {
        "names": ["unshare"],
        "action": "SCMP_ACT_ALLOW",
        "args": [
            {"index": 0, "value": UNSHARE_FORBIDDEN_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
        ],
        "comment": "mcpbox: sandbox-init creates its namespaces with unshare(2); namespace flags only",
    },
    {
        "names": ["mount", "umount2", "mount_setattr", "open_tree", "move_mount"],
        "action": "SCMP_ACT_ALLOW",
        "comment": "mcpbox: tmpfs root, read-only binds from handles (open_tree + move_mount, flags set with mount_setattr), fresh /proc, private /tmp; old root detached",
    },
    {
        "names": ["setns"],
        "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 1, "value": CLONE_NEWNET, "op": "SCMP_CMP_EQ"}],
        "comment": "mcpbox: PID 1 and the server join the sandbox's network namespace; that namespace type only",
    },
    {
        "names": ["pivot_root"],
        "action": "SCMP_ACT_ALLOW",
        "comment": "mcpbox: switch the sandbox to its new root",
    },
    {
        "names": ["sethostname"],
        "action": "SCMP_ACT_ALLOW",
        "comment": "mcpbox: fixed hostname in the sandbox's own UTS namespace",
    },
]


def generate(base):
    profile = copy.deepcopy(base)
    profile["syscalls"] = list(base["syscalls"]) + copy.deepcopy(ADDITIONS)
    return profile


def render(profile):
    return json.dumps(profile, indent="\t") + "\n"


def print_delta(out=sys.stdout):
    print("mcpbox additions to Docker's default seccomp profile:", file=out)
    for rule in ADDITIONS:
        cond = ""
        for a in rule.get("args", []):
            if a["op"] == "SCMP_CMP_MASKED_EQ":
                cond = f"  when (arg{a['index']} & {a['value']:#010x}) == {a['valueTwo']}"
            else:
                cond = f"  when arg{a['index']} == {a['value']:#010x}"
        print(f"  + {rule['action']} {', '.join(rule['names'])}{cond}", file=out)
        print(f"      {rule['comment']}", file=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=DEFAULT_BASE)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()

    with open(args.base, encoding="utf-8") as f:
        base = json.load(f)
    text = render(generate(base))

    if args.check:
        try:
            with open(args.out, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = ""
        if current != text:
            print(f"{args.out} is out of date: run deploy/gen-seccomp.py", file=sys.stderr)
            return 1
        print_delta()
        return 0

    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print_delta()
    print(f"wrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
