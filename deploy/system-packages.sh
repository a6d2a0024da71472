#!/usr/bin/env bash
# Installs the Debian packages that building, testing and running the cluster need, when they
# are missing. Safe to run again; needs root only when something is missing.
#   python3, python3-venv : the project's virtual environment
#   gcc, libc6-dev        : tests/c compiles a C program against proto/cluster_proto.h
#   fuse3                 : the workers' read-only FUSE view (mfusepy binds libfuse3)
#   samtools              : tests check the SAM output with samtools view (skipped without it)
#   strace                : a test reads a master's syscalls to prove its term and vote are fsynced
#   iproute2, nftables    : tests/rack puts every node on its own host (network namespaces on a
#                           bridge) and cuts the links between them (nft rules inside the namespaces)
set -euo pipefail
want=(python3 python3-venv gcc libc6-dev fuse3 samtools strace iproute2 nftables)
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# drop NAME: take one package off the list (whole names: ${missing[@]/python3} would also turn
# python3-venv into -venv)
drop() {
  local kept=() pkg
  for pkg in "${missing[@]}"; do [[ $pkg == "$1" ]] || kept+=("$pkg"); done
  missing=("${kept[@]}")
}
# A python3 that is not Debian's (pyenv, a container image) may already make venvs.
if [[ " ${missing[*]} " == *" python3-venv "* ]] && command -v python3 >/dev/null \
   && python3 -c 'import ensurepip, venv' 2>/dev/null; then
  drop python3-venv
fi
if [[ " ${missing[*]} " == *" python3 "* ]] && command -v python3 >/dev/null; then
  drop python3
fi
((${#missing[@]})) || exit 0
echo "installing system packages: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "need root to install ${missing[*]}: run 'sudo apt-get install ${missing[*]}' and try again" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
