#!/usr/bin/env bash
# System packages for the PACS/OHIF tests: Orthanc + its DICOMweb plugin, headless Chromium + ChromeDriver.
# Usage: bash scripts/ci_system_deps.sh   (as root, or with sudo available)
# Never fails: where apt is missing or refuses, it prints a warning and the tests that need these
# programs skip with a reason.
set -u
PKGS="orthanc orthanc-dicomweb chromium chromium-driver curl"
warn() { echo "ci_system_deps: WARNING: $*" >&2; }

missing=""
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing="$missing orthanc"
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc-dicomweb"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
if [ -z "$missing" ]; then
  echo "ci_system_deps: all present ($PKGS)"; exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  warn "apt-get not available; not installed:$missing (the Orthanc/browser tests will skip)"; exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    warn "not root and no password-less sudo; not installed:$missing"; exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# the package scripts must not start Orthanc as a system service: tests start their own
policy_added=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null && $SUDO chmod +x /usr/sbin/policy-rc.d && policy_added=1
fi
if ! $SUDO apt-get install -y --no-install-recommends $missing >/tmp/ci_system_deps.log 2>&1; then
  $SUDO apt-get update >>/tmp/ci_system_deps.log 2>&1 || true
  $SUDO apt-get install -y --no-install-recommends $missing >>/tmp/ci_system_deps.log 2>&1 \
    || warn "apt-get install$missing failed (log: /tmp/ci_system_deps.log); the tests that need them will skip"
fi
[ -n "$policy_added" ] && $SUDO rm -f /usr/sbin/policy-rc.d
# a packaged Orthanc service started anyway would hold port 8042: stop it (tests use their own ports)
if command -v service >/dev/null 2>&1; then $SUDO service orthanc stop >/dev/null 2>&1 || true; fi
for tool in Orthanc chromium chromedriver; do
  command -v $tool >/dev/null 2>&1 || [ -x /usr/sbin/$tool ] || warn "$tool still missing"
done
exit 0
