#!/bin/bash
# Relay RSS after publishing N health_alert lines with a SIZE-byte message (loopback only).
# usage: rss.sh BIN N SIZE
BIN=$1; N=$2; SIZE=$3; D=$(mktemp -d)
$BIN --data-dir $D serve --listen 127.0.0.1:0 --ingest 127.0.0.1:0 --admin 127.0.0.1:0 --ready-file $D/r.json 2>/dev/null & P=$!
for i in $(seq 100); do [ -f $D/r.json ] && break; sleep 0.05; done
IN=$(python3 -c "import json;print(json.load(open('$D/r.json'))['ingest'])")
echo "idle RSS: $(grep VmRSS /proc/$P/status)"
python3 -c "
import sys
m='m'*$SIZE
line=('{\"type\":\"health_alert\",\"agent\":null,\"data\":{\"component\":\"c\",\"severity\":\"warning\",\"message\":\"'+m+'\",\"threshold\":\"t\"}}\n').encode()
out=sys.stdout.buffer
for i in range($N): out.write(line)
" | $BIN publish --ingest $IN
echo "after: $(grep -E 'VmRSS|VmHWM' /proc/$P/status | tr '\n' ' ')"
kill $P; wait $P 2>/dev/null; rm -rf $D
