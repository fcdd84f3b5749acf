#!/bin/bash
# one process per layer; a crashing config is recorded and skipped on a retry of that layer
for i in $(seq 0 15); do
  skip=""
  for attempt in 1 2 3 4; do
    PYTHONPATH=src python3 .fp8m/fp8_micro.py $i "$skip" > /tmp/l$i.log 2>&1; rc=$?
    grep -v "^TRY" /tmp/l$i.log | grep -v Warn | tail -3
    [ $rc -eq 4 ] || break
    bad=$(grep "^TRY" /tmp/l$i.log | tail -1 | cut -d' ' -f2); echo "CRASH $i $bad"; skip="$skip,$bad"
  done
done
cd $OUT && python3 -c "
import json,glob
d={}
for f in sorted(glob.glob('fp8_micro_*.json')): d.update(json.load(open(f)))
json.dump(d, open('fp8_micro.json','w'), indent=1)
for b in (128,1024):
    i=sum(r[f'int8_b{b}'][0] for r in d.values()); f=sum(r[f'fp8_b{b}'][0] for r in d.values())
    print(f'b{b}: sum int8 {i:.1f} us, fp8 {f:.1f} us, ratio {f/i:.3f}')
"
rm -f $OUT/fp8_micro_*.json
