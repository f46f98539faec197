#!/bin/sh
# Prints a dozen lines over about two seconds, then succeeds.
set -eu
step="$1"
echo "hello: $step of ${XOOGIFY_ORGANIZATION:-?}/${XOOGIFY_ENVIRONMENT:-?} (build ${XOOGIFY_BUILD_ID:-?})"
i=1
while [ "$i" -le 10 ]; do
  echo "hello: step $i of 10"
  sleep 0.2
  i=$((i + 1))
done
echo "hello: $step done"
