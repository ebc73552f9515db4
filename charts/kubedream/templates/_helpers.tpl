{{/*
Names, labels and derived settings shared by every template.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubedream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object name: fullnameOverride, else the release name with the chart
name appended unless the release name already contains it. */}}
{{- define "kubedream.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "kubedream.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "kubedream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the release's operator pods (never a trainer pod: those carry no
instance label). */}}
{{- define "kubedream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubedream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object of the release. Templates add app.kubernetes.io/component. */}}
{{- define "kubedream.labels" -}}
helm.sh/chart: {{ include "kubedream.chart" . }}
{{ include "kubedream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubedream
{{- end -}}

{{/* The operator's ServiceAccount. */}}
{{- define "kubedream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubedream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion.
Call with (dict "image" .Values.image "root" .). */}}
{{- define "kubedream.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Whether the operator watches every namespace ("true" or ""). */}}
{{- define "kubedream.clusterWide" -}}
{{- if eq .Values.watch.scope "cluster" -}}true{{- end -}}
{{- end -}}

{{/* The watched namespaces as a JSON list (scope "namespaces"; the release namespace when
none are given). Use with fromJsonArray. */}}
{{- define "kubedream.watchNamespaces" -}}
{{- if .Values.watch.namespaces -}}
{{- .Values.watch.namespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{/* Whether the replicas peer through kopf ("true" or ""). */}}
{{- define "kubedream.peering" -}}
{{- if or (eq .Values.peering.mode "always") (gt (int .Values.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{/* The kopf peering object's name. */}}
{{- define "kubedream.peeringName" -}}
{{- default (include "kubedream.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/* The Secret the operator reads its own S3 keys from ("" for none). */}}
{{- define "kubedream.operatorS3Secret" -}}
{{- default .Values.s3.credentialsSecret .Values.s3.operatorCredentialsSecret -}}
{{- end -}}

{{/* The rules the operator needs in each namespace holding FineTuneJobs: one source for the
ClusterRole (scope cluster) and the per-namespace Roles (scope namespaces). Each rule is
what the operator calls (kubedream_operator.k8s, kopf's watching, patching and events). */}}
{{- define "kubedream.operatorRules" -}}
# kopf: watch FineTuneJobs and keep its progress annotations on them.
- apiGroups: ["kubedream.io"]
  resources: ["finetunejobs"]
  verbs: ["list", "watch", "patch"]
# kopf writes the status the handlers derive.
- apiGroups: ["kubedream.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# The children's owner references set blockOwnerDeletion, which clusters running the
# OwnerReferencesPermissionEnforcement admission plugin (OpenShift) allow only to those who
# may update the owner's finalizers.
- apiGroups: ["kubedream.io"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# kopf and the handlers post Events on FineTuneJobs.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# The trainer's ConfigMap (job.yaml) and rendezvous Service: read, then server-side applied.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create", "patch"]
# The trainer Job: read, created once, its run-policy fields patched (suspend, deadlines).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create", "patch"]
# The trainer pods, for status (restarts, failure messages).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end -}}

{{/* kopf peering: keep-alives in the peering object, watched for the other replicas. */}}
{{- define "kubedream.peeringRule" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ if include "kubedream.clusterWide" . }}"clusterkopfpeerings"{{ else }}"kopfpeerings"{{ end }}]
  resourceNames: [{{ include "kubedream.peeringName" . | quote }}]
  verbs: ["get", "patch"]
- apiGroups: ["kopf.dev"]
  resources: [{{ if include "kubedream.clusterWide" . }}"clusterkopfpeerings"{{ else }}"kopfpeerings"{{ end }}]
  verbs: ["list", "watch"]
{{- end -}}

{{/* "true" when the chart may render the kopf peering CRD named by the list's second item:
it does not exist yet, or this release owns it (lookup is empty under `helm template`). */}}
{{- define "kubedream.ownPeeringCrd" -}}
{{- $root := index . 0 -}}
{{- $existing := lookup "apiextensions.k8s.io/v1" "CustomResourceDefinition" "" (index . 1) -}}
{{- if not $existing -}}true
{{- else -}}
{{- $annotations := $existing.metadata.annotations | default dict -}}
{{- if and (eq (get $annotations "meta.helm.sh/release-name") $root.Release.Name) (eq (get $annotations "meta.helm.sh/release-namespace") $root.Release.Namespace) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* Hook annotations of the kopf peering objects (see peering.yaml). */}}
{{- define "kubedream.peeringHook" -}}
helm.sh/hook: post-install,post-upgrade
helm.sh/hook-delete-policy: before-hook-creation
{{- end -}}
