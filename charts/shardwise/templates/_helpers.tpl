{{/* Names, labels and small shared pieces of the shardwise chart. */}}

{{- define "shardwise.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart> unless the release name already contains the chart name; 63 chars max. */}}
{{- define "shardwise.fullname" -}}
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

{{- define "shardwise.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "shardwise.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardwise.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "shardwise.labels" -}}
helm.sh/chart: {{ include "shardwise.chart" . }}
{{ include "shardwise.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shardwise
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "shardwise.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shardwise.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shardwise.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The rules the operator needs on namespaced resources, wherever it watches. Every verb is used:
  paralleltrainingjobs        list, watch   kopf's watch of the jobs (an index + event handler)
                              delete        a finished job whose ttlSecondsAfterFinished has passed
  paralleltrainingjobs/status patch         the one status merge-patch per reconcile pass
  pods                        list, watch   kopf's watches (job pods; bound pods for the GPU inventory)
                              create, get   trainer pods are created; a 409 is followed by a get
                                            to check the owner (kube/children.py); never patched
                              delete        gang restarts, suspend, and freeing the GPUs of a
                                            finished job's pods that still run
  services, configmaps        create, get, patch   the headless Service and <job>-layout:
                                            create-or-adopt, and a merge-patch when they drift
                              list, watch   kopf's watches of the job's children: one deleted
                                            under a running job is restored at once
  events                      create        Events on the job (kube/events.py and kopf's posting)
Services and ConfigMaps are never deleted by the operator: they go with their job through owner
references (the garbage collector).
No Secrets: the operator never reads or writes one.
With kueue.enabled (jobs labelled kueue.x-k8s.io/queue-name):
  workloads                   create, get   the job's Workload (owner reference to the job, so the
                                            garbage collector deletes it), read every pass while queued
                              delete        replaced when a re-plan changes the job's node count
  workloads/status            patch         Finished when the job ends (Kueue releases the quota);
                                            admission cleared after an eviction's pods are gone
With gangScheduling.coscheduling / .volcano (spec.scheduling.gang):
  podgroups (scheduling.x-k8s.io / scheduling.volcano.sh)  create, get, patch   the job's PodGroup:
                                            create-or-adopt, patched on drift; deleted with the job
*/}}
{{- define "shardwise.namespacedRules" -}}
- apiGroups: ["shardwise.dev"]
  resources: ["paralleltrainingjobs"]
  verbs: ["list", "watch", "delete"]
- apiGroups: ["shardwise.dev"]
  resources: ["paralleltrainingjobs/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["create", "get", "list", "watch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["create", "get", "patch", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.kueue.enabled }}
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["create", "get", "delete"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads/status"]
  verbs: ["patch"]
{{- end }}
{{- if .Values.gangScheduling.coscheduling }}
- apiGroups: ["scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["create", "get", "patch"]
{{- end }}
{{- if .Values.gangScheduling.volcano }}
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["create", "get", "patch"]
{{- end }}
{{- end }}

{{/*
Cluster-scoped rules, needed in both modes:
  nodes                      list, watch   the GPU inventory (allocatable GPUs, GFD labels)
  priorityclasses            list, watch   the GPU queue's order: a job's PriorityClass value
  customresourcedefinitions  list, watch   kopf's resource observation: it notices the CRD being
                                           (re)installed while it runs; without it kopf logs a
                                           warning and only scans the API at startup
  resourceflavors, workloadpriorityclasses  get   (kueue.enabled) the admitted flavor's node labels
                                           and tolerations; the priority of the job's Workload
*/}}
{{- define "shardwise.clusterRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
- apiGroups: ["scheduling.k8s.io"]
  resources: ["priorityclasses"]
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.kueue.enabled }}
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["resourceflavors", "workloadpriorityclasses"]
  verbs: ["get"]
{{- end }}
{{- end }}
