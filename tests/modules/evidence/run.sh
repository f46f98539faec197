#!/bin/sh
# One line per execution; O_APPEND writes this short are atomic, so runners may share it.
echo "$XOOGIFY_BUILD_ID" >> "$XOOGIFY_VAR_evidence"
echo "build $XOOGIFY_BUILD_ID: $XOOGIFY_ACTION on $XOOGIFY_ENVIRONMENT"
sleep "${XOOGIFY_VAR_seconds:-0.5}"
echo "done"
