{{/*
Valve's alert rules: the "groups" of a Prometheus rules file. Every expression is "<series> <comparison>
<threshold>" on metrics the code exports (docs/metrics.md, where each alert has its runbook); the tests
evaluate each left-hand side against a real Prometheus and run promtool's unit tests on the rendered file.
*/}}
{{- define "valve.alertGroups" -}}
{{- $a := .Values.metrics.alerts }}
{{- $slo := $a.onlineSlo }}
{{- $runbook := $a.runbookUrl }}
{{- $named := list }}
{{- range $slo.pairs }}{{ $named = append $named (regexQuoteMeta .pair) }}{{- end }}
{{- $others := "" }}
{{- if $named }}{{ $others = printf "{pair!~%q}" (join "|" $named) }}{{- end -}}
groups:
  - name: valve.online
    rules:
      {{- $default := dict "slo" "default" "selector" $others "ttft" $slo.ttftP99Seconds "tpot" $slo.tpotP99Seconds }}
      {{- $pairs := list $default }}
      {{- range $slo.pairs }}
      {{- $pairs = append $pairs (dict "slo" "pair" "selector" (printf "{pair=%q}" .pair) "ttft" (default $slo.ttftP99Seconds .ttftP99Seconds) "tpot" (default $slo.tpotP99Seconds .tpotP99Seconds)) }}
      {{- end }}
      {{- range $pairs }}
      {{- $p := . }}
      {{- range list (list "TTFT" "ttft" $p.ttft "time to first token") (list "TPOT" "tpot" $p.tpot "time per output token") }}
      - alert: ValveOnline{{ index . 0 }}High
        expr: histogram_quantile(0.99, sum by (namespace, pair, le) (rate(valve_online_{{ index . 1 }}_seconds_bucket{{ $p.selector }}[{{ $slo.window }}]))) > {{ index . 2 }}
        for: {{ $slo.for }}
        labels:
          severity: {{ $a.severity.slo }}
          slo: {{ $p.slo }}  # the default threshold, or the pair's own (one rule each)
        annotations:
          summary: {{ printf "Online p99 %s over %vs" (index . 0) (index . 2) | quote }}
          description: {{`'Pair {{ $labels.namespace }}/{{ $labels.pair }}: p99 `}}{{ index . 3 }}{{` {{ $value | humanizeDuration }} over `}}{{ $slo.window }}{{`.'`}}
          runbook_url: {{ $runbook }}#valveonline{{ index . 1 }}high
      {{- end }}
      {{- end }}
  - name: valve.runtime
    rules:
      - alert: ValveGateForcedOpen
        expr: sum by (namespace, pair, node, gpu) (increase(valve_gate_forced_opens_total[10m])) > 0
        labels:
          severity: {{ $a.severity.runtime }}
        annotations:
          summary: The arbiter was lost; offline opened the gate itself
          description: {{`'GPU {{ $labels.gpu }} on {{ $labels.node }} (pair {{ $labels.namespace }}/{{ $labels.pair }}): {{ $value }} forced opens in 10m; online ran unprotected meanwhile.'`}}
          runbook_url: {{ $runbook }}#valvegateforcedopen
      - alert: ValveGateViolation
        expr: sum by (namespace, pair, node, gpu) (increase(valve_gate_violations_total[10m])) > 0
        labels:
          severity: {{ $a.severity.runtime }}
        annotations:
          summary: An offline tenant worked on the GPU while its gate was closed
          description: {{`'GPU {{ $labels.gpu }} on {{ $labels.node }} (pair {{ $labels.namespace }}/{{ $labels.pair }}): {{ $value }} closed periods in 10m in which offline did not stop.'`}}
          runbook_url: {{ $runbook }}#valvegateviolation
      - alert: ValveReserveShortfall
        expr: max by (namespace, pair, node, gpu) (valve_memory_reserve_shortfall_bytes) > 0
        for: {{ $a.reserveShortfallFor }}
        labels:
          severity: {{ $a.severity.runtime }}
        annotations:
          summary: The online memory reserve cannot be met
          description: {{`'GPU {{ $labels.gpu }} on {{ $labels.node }}: {{ $value | humanize1024 }}B of the reserve cannot be covered by the offline pool.'`}}
          runbook_url: {{ $runbook }}#valvereserveshortfall
      - alert: ValveReclaimTimeouts
        expr: sum by (namespace, pair, node, gpu) (increase(valve_reclaim_timeouts_total[10m])) > 0
        labels:
          severity: {{ $a.severity.runtime }}
        annotations:
          summary: The offline client does not answer reclaim requests
          description: {{`'GPU {{ $labels.gpu }} on {{ $labels.node }}: {{ $value }} reclaim requests unanswered in 10m.'`}}
          runbook_url: {{ $runbook }}#valvereclaimtimeouts
      - alert: ValveReclaimSlow
        expr: histogram_quantile(0.99, sum by (namespace, pair, node, gpu, le) (rate(valve_reclaim_latency_seconds_bucket[10m]))) > {{ $a.reclaimLatencyP99Seconds }}
        for: 10m
        labels:
          severity: {{ $a.severity.runtime }}
        annotations:
          summary: {{ printf "Reclaim p99 latency over %vs" $a.reclaimLatencyP99Seconds | quote }}
          description: {{`'GPU {{ $labels.gpu }} on {{ $labels.node }}: reclaim p99 {{ $value | humanizeDuration }}.'`}}
          runbook_url: {{ $runbook }}#valvereclaimslow
      - alert: ValvePreemptionsCapped
        expr: sum by (namespace, pair, node, gpu) (rate(valve_preemptions_capped_total[5m])) > 0
        for: {{ $a.preemptionsCappedFor }}
        labels:
          severity: {{ $a.severity.runtime }}
        annotations:
          summary: Online bursts run with the gate open (preemption rate at its cap)
          description: {{`'GPU {{ $labels.gpu }} on {{ $labels.node }}: {{ $value | humanize }} capped closures/s.'`}}
          runbook_url: {{ $runbook }}#valvepreemptionscapped
  - name: valve.cluster
    rules:
      - alert: ValveGPUUnhealthy
        expr: min by (node, gpu) (valve_device_healthy) == 0
        for: 1m
        labels:
          severity: {{ $a.severity.cluster }}
        annotations:
          summary: A GPU is advertised unhealthy (XID)
          description: {{`'GPU {{ $labels.gpu }} on {{ $labels.node }} is unhealthy; its pairs cannot be placed there.'`}}
          runbook_url: {{ $runbook }}#valvegpuunhealthy
      - alert: ValveOperatorReconcileErrors
        expr: sum by (namespace, job) (increase(valve_reconcile_errors_total[10m])) > 0
        for: 10m
        labels:
          severity: {{ $a.severity.cluster }}
        annotations:
          summary: The operator keeps failing to reconcile pairs
          description: {{`'{{ $value }} reconcile errors in 10m.'`}}
          runbook_url: {{ $runbook }}#valveoperatorreconcileerrors
      - alert: ValveDevicePluginNotRegistered
        expr: min by (node, resource) (valve_device_plugin_registered) == 0
        for: 5m
        labels:
          severity: {{ $a.severity.cluster }}
        annotations:
          summary: The device plugin is not registered with the kubelet
          description: {{`'{{ $labels.resource }} on {{ $labels.node }}: not registered; no new pairs land there.'`}}
          runbook_url: {{ $runbook }}#valvedevicepluginnotregistered
{{- end }}
