{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "remedy.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object names: the release name, unless it already contains the chart name. */}}
{{- define "remedy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "remedy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "remedy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "remedy.labels" -}}
{{ include "remedy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "remedy.policiesConfigMap" -}}
{{- .Values.config.existingPoliciesConfigMap | default (printf "%s-policies" (include "remedy.fullname" .)) -}}
{{- end -}}

{{- define "remedy.playbooksConfigMap" -}}
{{- .Values.config.existingPlaybooksConfigMap | default (printf "%s-playbooks" (include "remedy.fullname" .)) -}}
{{- end -}}
