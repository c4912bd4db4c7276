{{/*
Names and labels of every object the chart creates. The plain manifests (manifests/, a kustomize base) carry the
same names and labels as a release named simpo-interleave, less the two that Helm owns (helm.sh/chart and
app.kubernetes.io/managed-by); tests/operator/test_deployment.py checks.
*/}}

{{/*
Expand the name of the chart.
*/}}
{{- define "simpo-interleave.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name: the release name, prefixed to the chart name unless it contains it.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec); the
component names below add up to 9 characters, so the prefix is truncated to 54.
*/}}
{{- define "simpo-interleave.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "simpo-interleave.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels of every object.
*/}}
{{- define "simpo-interleave.labels" -}}
helm.sh/chart: {{ include "simpo-interleave.chart" . }}
{{ include "simpo-interleave.selectorLabels" . }}
{{- with .Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "simpo-interleave.selectorLabels" -}}
app.kubernetes.io/name: {{ include "simpo-interleave.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The operator: the name of its Deployment, ServiceAccount, ClusterRole and ClusterRoleBinding, and its labels.
*/}}
{{- define "simpo-interleave.operator.name" -}}
{{ include "simpo-interleave.fullname" . }}-operator
{{- end }}

{{- define "simpo-interleave.operator.labels" -}}
{{ include "simpo-interleave.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "simpo-interleave.operator.selectorLabels" -}}
{{ include "simpo-interleave.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The operator image: the tag defaults to the chart's appVersion.
*/}}
{{- define "simpo-interleave.operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The workers (the pods of the jobs' JobSets): the name of their ClusterRole and of its RoleBinding in each job
namespace, and their labels. Their ServiceAccount is named by worker.serviceAccountName, not by the release: it is
what the jobs' spec.serviceAccountName refers to.
*/}}
{{- define "simpo-interleave.worker.name" -}}
{{ include "simpo-interleave.fullname" . }}-worker
{{- end }}

{{- define "simpo-interleave.worker.labels" -}}
{{ include "simpo-interleave.labels" . }}
app.kubernetes.io/component: worker
{{- end }}
