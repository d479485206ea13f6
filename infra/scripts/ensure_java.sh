#!/usr/bin/env bash
# Make sure a Java >= 17 runtime is present (Spark needs it). Installs it with apt when we
# are root and apt is available; otherwise says exactly what to install and fails.
set -euo pipefail
major() { java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'; }
if command -v java >/dev/null 2>&1 && [ "$(major)" -ge 17 ] 2>/dev/null; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Java >= 17 not found: installing openjdk-17-jre-headless with apt-get" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  exit 0
fi
echo "Java >= 17 is required by Spark and was not found." >&2
echo "Install it, e.g.: sudo apt-get install openjdk-17-jre-headless   (Debian/Ubuntu)" >&2
echo "              or: brew install openjdk@17                        (macOS)" >&2
exit 1
