"""What the built image must be before any host runs it: non-root, with its HEALTHCHECK and
STOPSIGNAL, and nothing of the build's secrets left in it (the CA bundle pip trusted
behind a TLS-intercepting proxy is mounted for the install only, never copied)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hosts.podman import Podman, options

USER = "10001:10001"

# Run as root in a throwaway container of the image: every file whose content is the CA
# file's, and whatever /run/secrets holds (a secret mount leaves an empty directory at most).
FIND = """
import hashlib, os, sys
size, digest = int(sys.argv[1]), sys.argv[2]
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in ("/proc", "/sys", "/dev")]
    for name in files:
        path = os.path.join(top, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == size \\
                    and hashlib.sha256(open(path, "rb").read()).hexdigest() == digest:
                print("copy of the CA file:", path)
        except OSError:
            pass
for name in os.listdir("/run/secrets") if os.path.isdir("/run/secrets") else ():
    print("left in /run/secrets:", name)
"""


def check_image(podman: Podman, image: str, build_ca: Path | None) -> tuple[int, list[str]]:
    """(the image's size in bytes, what is wrong with it)."""
    config = json.loads(podman("image", "inspect", image).stdout)[0]
    problems = []
    settings = config["Config"]
    if settings.get("User") != USER:
        problems.append(f"image user {settings.get('User')!r}, not {USER}")
    # docker keeps it in Config, podman beside it
    if not (settings.get("Healthcheck") or config.get("Healthcheck") or {}).get("Test"):
        problems.append("no HEALTHCHECK (podman: build with --format docker)")
    if settings.get("StopSignal") != "SIGTERM":
        problems.append(f"stop signal {settings.get('StopSignal')!r}")
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    if "BEGIN CERTIFICATE" in history or "PRIVATE KEY" in history:
        problems.append("a certificate or key in the image's history")
    data = build_ca.read_bytes() if build_ca else b""
    found = podman("run", "--rm", *options(), "--user", "0", "--network", "none", "--entrypoint", "python3", image,
                   "-c", FIND, str(len(data) if build_ca else -1), hashlib.sha256(data).hexdigest(),
                   timeout=600).stdout.split("\n")
    problems += [line for line in found if line]
    return int(config["Size"]), problems
