{{/* Chart name. */}}
{{- define "valve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object-name prefix: <release>-valve, or the release name when it already contains the chart name. */}}
{{- define "valve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* <fullname>-<component>, kept within 63 characters. Call with (dict "root" $ "component" "operator"). */}}
{{- define "valve.componentName" -}}
{{- $prefix := include "valve.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix .component }}
{{- end }}

{{- define "valve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "valve.labels" -}}
helm.sh/chart: {{ include "valve.chart" . }}
app.kubernetes.io/name: {{ include "valve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: valve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component. Call with (dict "root" $ "component" "operator"). */}}
{{- define "valve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "valve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component: common + selector. */}}
{{- define "valve.componentLabels" -}}
{{ include "valve.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The image reference: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "valve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "valve.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "valve.componentName" (dict "root" . "component" "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Whether a Prometheus Operator kind is rendered. Call with (dict "root" $ "enabled" <true|false|"auto"> "kind" "ServiceMonitor").
"auto": only when the cluster (or `helm template --api-versions`) serves monitoring.coreos.com/v1/<kind>.
Prints "true" or nothing.
*/}}
{{- define "valve.monitorEnabled" -}}
{{- $e := .enabled }}
{{- if eq (toString $e) "auto" }}
{{- if .root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" .kind) }}true{{ end }}
{{- else if eq (toString $e) "true" }}true
{{- end }}
{{- end }}

{{/* prometheus.io annotations for pods that serve /metrics on a port. Call with (dict "root" $ "port" 9090). */}}
{{- define "valve.scrapeAnnotations" -}}
{{- if .root.Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* The metrics bind address (valve/api/contract.py ENV_METRICS_ADDR, read by --metrics-addr): metrics.bindAddress,
or else the pod's own IP, so the endpoints are not on every interface. An env entry of a container. */}}
{{- define "valve.metricsAddrEnv" -}}
- name: VALVE_METRICS_ADDR
  {{- if .Values.metrics.bindAddress }}
  value: {{ .Values.metrics.bindAddress | quote }}
  {{- else }}
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
  {{- end }}
{{- end }}

{{/* The Secret with the webhook's certificate (tls.crt, tls.key; ca.crt): the chart's or cert-manager's. */}}
{{- define "valve.webhookSecretName" -}}
{{- include "valve.componentName" (dict "root" . "component" "webhook-tls") }}
{{- end }}
