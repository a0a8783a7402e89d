#!/usr/bin/env bash
# A local Orthanc PACS with DICOMweb for MONAI Label and OHIF (Debian packages orthanc, orthanc-dicomweb).
#
# Usage:
#   bash scripts/orthanc.sh start  DIR [HTTP_PORT]   # default port 8042; DICOMweb at http://127.0.0.1:PORT/dicom-web
#   bash scripts/orthanc.sh stop   DIR
#   bash scripts/orthanc.sh status DIR
#
# DIR holds everything of this Orthanc: its own config (DIR/orthanc.json), the DICOM storage and
# index (DIR/storage), the log (DIR/orthanc.log) and the process id (DIR/orthanc.pid).
# Access: loopback only. Orthanc listens on the port on all interfaces, but RemoteAccessAllowed is
# false, so it answers only clients on this machine (127.0.0.1); no user name or password.
# The DICOM (C-STORE/C-FIND) listener is off: everything goes through HTTP/DICOMweb.
# Environment: ORTHANC (the Orthanc binary, default: Orthanc on PATH or /usr/sbin/Orthanc),
# ORTHANC_DICOMWEB_PLUGIN (default /usr/share/orthanc/plugins/libOrthancDicomWeb.so).
set -euo pipefail

usage() { sed -n '4,8p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$2
port=${3:-8042}

find_orthanc() {
  if [ -n "${ORTHANC:-}" ]; then echo "$ORTHANC"; return; fi
  command -v Orthanc 2>/dev/null || { [ -x /usr/sbin/Orthanc ] && echo /usr/sbin/Orthanc; } || true
}

running_pid() {
  local pid
  [ -f "$dir/orthanc.pid" ] || return 1
  pid=$(cat "$dir/orthanc.pid")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

case "$cmd" in
  start)
    bin=$(find_orthanc)
    plugin=${ORTHANC_DICOMWEB_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}
    if [ -z "$bin" ]; then
      echo "orthanc.sh: Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)" >&2; exit 3
    fi
    if [ ! -e "$plugin" ]; then
      echo "orthanc.sh: the DICOMweb plugin $plugin is missing (Debian: apt-get install orthanc-dicomweb)" >&2; exit 3
    fi
    if pid=$(running_pid); then
      echo "orthanc.sh: already running (pid $pid) for $dir" >&2; exit 1
    fi
    mkdir -p "$dir/storage"
    dir=$(cd "$dir" && pwd)
    cat > "$dir/orthanc.json" <<EOF
{
  "Name": "SDFSMIS-PACS",
  "StorageDirectory": "$dir/storage",
  "IndexDirectory": "$dir/storage",
  "StorageCompression": false,
  "HttpServerEnabled": true,
  "HttpPort": $port,
  "HttpDescribeErrors": true,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomServerEnabled": false,
  "SaveJobs": false,
  "StableAge": 2,
  "Plugins": ["$plugin"],
  "DicomWeb": {
    "Enable": true,
    "Root": "/dicom-web/",
    "EnableWado": true,
    "WadoRoot": "/wado",
    "Host": "127.0.0.1:$port",
    "Ssl": false,
    "StudiesMetadata": "Full",
    "SeriesMetadata": "Full"
  }
}
EOF
    nohup "$bin" "$dir/orthanc.json" > "$dir/orthanc.log" 2>&1 < /dev/null &
    echo $! > "$dir/orthanc.pid"
    for _ in $(seq 1 100); do
      if curl -sf "http://127.0.0.1:$port/dicom-web/studies" -o /dev/null 2>/dev/null; then
        echo "Orthanc running (pid $(cat "$dir/orthanc.pid")): DICOMweb at http://127.0.0.1:$port/dicom-web"
        exit 0
      fi
      if ! running_pid > /dev/null; then
        echo "orthanc.sh: Orthanc exited at start-up; its log ($dir/orthanc.log):" >&2
        tail -20 "$dir/orthanc.log" >&2; exit 1
      fi
      sleep 0.2
    done
    echo "orthanc.sh: Orthanc did not answer on port $port within 20 s; see $dir/orthanc.log" >&2
    exit 1
    ;;
  stop)
    if pid=$(running_pid); then
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      echo "Orthanc stopped (pid $pid)"
    else
      echo "Orthanc not running for $dir"
    fi
    rm -f "$dir/orthanc.pid"
    ;;
  status)
    if pid=$(running_pid); then echo "running (pid $pid)"; else echo "not running"; exit 1; fi
    ;;
  *) usage ;;
esac
