#!/bin/sh
# Always fails: prints an error and exits 3.
echo "broken: starting ${XOOGIFY_ACTION:-?}"
echo "Error: broken module failed on purpose" >&2
exit 3
