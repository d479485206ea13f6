#!/usr/bin/env bash
# System packages the Python venv cannot bring: a Java >= 17 runtime (Spark), OpenMP
# (implicit's wheel links the system libgomp) and, optionally, a native BLAS for Spark
# MLlib (ALS ~30% faster), a headless Chromium + chromedriver (the web console's browser
# tests) and Redis 7 + HAProxy 2.6 (`make run REPLICAS=N`: the fleet's shared channel and
# front door, and their tests). Installs what is missing with apt when we are root;
# otherwise says exactly what to install. Only Java is required. LAMBDAREC_NO_BROWSER=1
# skips Chromium (container images: infra/Dockerfile).
set -euo pipefail

java_major() {
  java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'
}
have_java() { command -v java >/dev/null 2>&1 && [ "$(java_major)" -ge 17 ] 2>/dev/null; }
have_deb() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
can_apt() { [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; }

missing=()
have_java || missing+=(openjdk-17-jre-headless)
if command -v dpkg-query >/dev/null 2>&1; then
  have_deb libgomp1 || missing+=(libgomp1)
  have_deb libopenblas0-pthread || missing+=(libopenblas0-pthread)
  if [ "${LAMBDAREC_NO_BROWSER:-0}" != 1 ]; then
    have_deb chromium || missing+=(chromium)
    have_deb chromium-driver || missing+=(chromium-driver)
  fi
  have_deb redis-server || missing+=(redis-server)
  have_deb haproxy || missing+=(haproxy)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if can_apt; then
  echo "installing system packages with apt-get: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
if ! have_java; then
  echo "Java >= 17 is required by Spark and was not found." >&2
  echo "Install it, e.g.: sudo apt-get install openjdk-17-jre-headless   (Debian/Ubuntu)" >&2
  echo "              or: brew install openjdk@17                        (macOS)" >&2
  exit 1
fi
echo "note: optional packages missing (${missing[*]}); Spark MLlib runs slower without native BLAS, the console's browser tests skip without chromium, REPLICAS>1 and the fleet tests need redis-server and haproxy" >&2
