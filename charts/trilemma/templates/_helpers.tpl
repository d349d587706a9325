{{/* Chart name, overridable; cut to 63 characters because Kubernetes names and labels must fit. */}}
{{- define "trilemma.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name for the release's objects: "<release>-<chart>", or the release name alone when it
already contains the chart name (a release called "trilemma" gives "trilemma", not
"trilemma-trilemma"). Cut to 52 characters, not 63, so that the "-namespaced" suffix of the
longest ClusterRole name still fits.
*/}}
{{- define "trilemma.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "trilemma.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "trilemma.labels" -}}
helm.sh/chart: {{ include "trilemma.chart" . }}
{{ include "trilemma.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trilemma
{{- end }}

{{/* The subset that selects the operator's pods; immutable in a Deployment, so kept minimal. */}}
{{- define "trilemma.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trilemma.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "trilemma.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trilemma.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "trilemma.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
"true" when the replicas run with Kopf peering, "" otherwise (templates test it with `if`).
More than one replica without peering would handle every object twice, so replicas > 1 forces it.
*/}}
{{- define "trilemma.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicas) 1) }}true{{ end }}
{{- end }}

{{/*
The `kopf run` arguments after "run". The module, liveness endpoint and scope flags are the
contract with the operator image (see the Dockerfile's CMD, which is the same command with
--all-namespaces and --standalone).
*/}}
{{- define "trilemma.kopfArgs" -}}
- --module=trilemma.operator.handlers
- --liveness=http://0.0.0.0:8080/healthz
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- else }}
- --all-namespaces
{{- end }}
{{- if include "trilemma.peering" . }}
- --peering={{ .Values.peering.name }}
{{- else }}
- --standalone
{{- end }}
{{- if ne .Values.logLevel "info" }}
- --{{ .Values.logLevel }}
{{- end }}
- --log-format={{ .Values.logFormat }}
{{- end }}
