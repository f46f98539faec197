#!/bin/sh
# Prints a line a second for $XOOGIFY_VAR_seconds seconds (default 600), then succeeds.
seconds="${XOOGIFY_VAR_seconds:-600}"
i=1
while [ "$i" -le "$seconds" ]; do
  echo "slow: second $i of $seconds"
  sleep 1
  i=$((i + 1))
done
echo "slow: done"
