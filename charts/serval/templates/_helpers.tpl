{{/* Chart name, overridable. */}}
{{- define "serval.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: the release name, plus the chart name unless it is in it. */}}
{{- define "serval.fullname" -}}
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

{{/* Names of the operator's objects. */}}
{{- define "serval.operatorName" -}}
{{- printf "%s-operator" (include "serval.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "serval.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "serval.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels of every object but the component. */}}
{{- define "serval.baseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "serval.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: serval
{{- end }}

{{- define "serval.labels" -}}
{{ include "serval.baseLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Stable across upgrades: a Deployment's selector is immutable. */}}
{{- define "serval.selectorLabels" -}}
app.kubernetes.io/name: {{ include "serval.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* "<registry>/<repository>:<tag>", the tag defaulting to the appVersion. Call with
     (dict "image" .Values.x.image "root" .). */}}
{{- define "serval.image" -}}
{{- $repo := .image.repository }}
{{- with .root.Values.imageRegistry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}
{{- end }}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
